from fastformer.cli import main

main()
