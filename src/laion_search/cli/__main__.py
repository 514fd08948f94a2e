from laion_search.cli.main import main

main()
