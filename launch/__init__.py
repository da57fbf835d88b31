"""Launchers that run jaxedit jobs on TPU pods, GKE clusters and local process groups."""
