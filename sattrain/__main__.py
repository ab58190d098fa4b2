"""``python -m sattrain``: the ``sattrain`` command (the console script of pyproject.toml), also
what ``torchrun --nproc-per-node N -m sattrain run STORE ...`` starts in each process."""

from sattrain.cli import main

if __name__ == "__main__":
    main(prog_name="sattrain")
