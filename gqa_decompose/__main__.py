"""python -m gqa_decompose"""

from gqa_decompose.cli import main

if __name__ == "__main__":
    main()
