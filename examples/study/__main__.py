from .run import main

if __name__ == "__main__":  # spawned workers import this module too: only the parent runs
    main()
