"""The one home of LoRA handling, in floors (a floor imports only the ones above it):

    weight_keys   names of fusion weights per adapter, block and projection; w(a, module)
    saved         pure maths on saved PEFT adapters: read, check, fuse exactly, deltas
    runtime       a live PeftModel: attach adapters, switch, set fusion weights
    dropout       the training LoRA dropout with cheap masks (same semantics as PEFT's)
    peft_layers   every touch of PEFT's layer internals, version-gated: the lean LoRA forward
                  (same function as PEFT's, fewer full-width passes), the dropout swap, tensor
                  scales for learning fusion weights

Nothing here imports a stage (train, search, evaluate) or the model loader; the merged-model
export, which loads the base, lives in `fusion/export.py`.
"""
