"""``python -m freeadv_pl`` runs the command line."""

from freeadv_pl.cli import main

if __name__ == "__main__":
    main()
