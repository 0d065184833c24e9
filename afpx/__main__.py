from afpx.cli import main

main()
