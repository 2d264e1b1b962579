from discoproxy.cli import main

main()
