"""Numeric transforms applied to a built model from outside (float8 training), and the torchao
import they share with the low-memory optimizers. Like PEFT, AC and compile, nothing here
touches a model family's code; see docs/lowmem.md."""
