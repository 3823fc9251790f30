from polyalign.cli import main

main()
