import sys

from sluicegate.cli.main import main

sys.exit(main(sys.argv[1:]))
