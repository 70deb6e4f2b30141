# ViG-H-T: the ViG recipe with fp16 mixed precision, as the official hierarchical runs.
_base_ = ['./vig_t_8xb128_in1k.py']
model = dict(model_name='vig_h_t', model_args=dict(drop_path_rate=0.2))
optim_wrapper = dict(type='AmpOptimWrapper', dtype='float16', loss_scale='dynamic')
