"""python -m dlmnumba"""
from .cli import main

main(prog_name="dlmnumba")
