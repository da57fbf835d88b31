import sys

from jaxedit.cli import main

sys.exit(main())
