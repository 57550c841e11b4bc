"""`python -m app [uvicorn options]`: serve as the container does (app/processes.py)."""

import sys

from app.processes import main

sys.exit(main(sys.argv[1:]))
