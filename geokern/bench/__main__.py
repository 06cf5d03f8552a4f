from geokern.bench.runner import main

main()
