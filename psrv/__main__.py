from psrv.cli import main

main()
