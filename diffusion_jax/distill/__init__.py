"""Few-step sampling by distillation (`--mode=distill`): progressive.py holds the
maths, rounds.py runs the rounds as ordinary workdirs."""
