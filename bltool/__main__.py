"""`python -m bltool` (also what `torchrun -m bltool` runs)."""

from bltool.cli import main

if __name__ == "__main__":
    main()
