"""python -m hefeat.cli"""

from hefeat.cli import main

main(prog_name="hefeat")
