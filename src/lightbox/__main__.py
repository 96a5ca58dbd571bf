import sys

from lightbox.cli.main import main

sys.exit(main())
