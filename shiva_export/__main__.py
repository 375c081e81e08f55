import sys

from shiva_export.cli import main

sys.exit(main())
