"""LoRA initialisation from (W, Q, H): cloq | quailora | loftq | zero. (Being built: issue 3.)"""


def init_lora(W, qw, H, rank, method="cloq", scaling=1.0, **opts):
    raise NotImplementedError("init_lora is not built yet")
