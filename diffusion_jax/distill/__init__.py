"""Few-step sampling by distillation (`--mode=distill`): progressive.py holds the
maths, guided.py that of distilling classifier-free guidance, rounds.py runs the
stages as ordinary workdirs."""
