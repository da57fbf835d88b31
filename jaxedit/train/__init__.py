"""The training core below every trainer: the loop with its periodic hooks (`loop`), the
optimizer and EMA step (`optimizer`), the run's records (metrics log, validation curve,
sample grids: `records`) and the setup a trainer builds from its config (`setup`)."""
