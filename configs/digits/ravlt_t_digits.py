# A hierarchical model (RAVLT-T's layout: RALA + softmax stages) shrunk for a CPU, on the digits CPU
# recipe of vig_t_digits.py plus RAVLT's repeated augmentation.
_base_ = ['./vig_t_digits.py']

model = dict(
    model_name='ravlt_t',
    model_args=dict(_delete_=True, num_classes=10, embed_dims=(32, 32, 64, 64), depths=(1, 1, 2, 1),
                    num_heads=(1, 1, 2, 2), head_hidden_size=128),
)
train_dataloader = dict(sampler=dict(_delete_=True, type='RepeatedAugmentationSampler', shuffle=True, num_repeats=3))
