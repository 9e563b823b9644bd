from fastformer.cli import main

if __name__ == "__main__":  # compile workers of `inspect` import this module again: they must not rerun the CLI
    main()
