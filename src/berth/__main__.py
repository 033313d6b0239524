from berth.cli.main import console

console()
