"""`python -m satdata ...`: the same command as the `satdata` script."""

from satdata.cli import main

if __name__ == "__main__":
    main(prog_name="satdata")
