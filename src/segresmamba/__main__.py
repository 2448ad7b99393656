from segresmamba.cli import main

main()
