"""The qisd command line (placeholder until the CLI lands)."""


def main() -> None:
    raise SystemExit("qisd: the command line is not built yet")
