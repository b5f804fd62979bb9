"""`python -m dispatch.cli`."""
from dispatch.cli.main import main

main()
