"""`parrot.configs`: the DeepSpeed configs shipped with the package (`parrot train --deepspeed zero2|zero3`).

zero2.json is stage 1's recipe (ZeRO-2), zero3.json stage 2's (ZeRO-3); their "auto" fields are filled from
the run's flags (parrot.training.ds_config). The files are package data, so a wheel install has them too.
"""
