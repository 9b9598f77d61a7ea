from stableopd.cli import main

main()
