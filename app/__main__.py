"""`python -m app` starts kopa, exactly as the `kopa` console script does."""

from app.cli import main

if __name__ == "__main__":
    main()
