import sys

from twinstudio.cli import main

sys.exit(main())
