from butterfly.cli import main

main()
