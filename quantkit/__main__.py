"""`python -m quantkit ...` and the `quantkit` console script."""
from .cli import main

if __name__ == "__main__":
    main()
