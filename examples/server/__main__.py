from examples.server.serve import main

main()
