# A hierarchical ViG (ViG-H-T's layout) shrunk for a CPU, on the digits CPU recipe of vig_t_digits.py.
_base_ = ['./vig_t_digits.py']

model = dict(
    model_name='vig_h_t',
    model_args=dict(_delete_=True, num_classes=10, embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
)
