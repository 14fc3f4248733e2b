from modeltest.cli import main

main()
