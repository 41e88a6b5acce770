"""``python -m qisd``: the same as the ``qisd`` command."""

from qisd_cli.app import main

if __name__ == "__main__":
    main()
