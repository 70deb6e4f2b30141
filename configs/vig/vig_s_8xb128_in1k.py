_base_ = ['./vig_t_8xb128_in1k.py']
model = dict(model_name='vig_s', model_args=dict(drop_path_rate=0.2))
optim_wrapper = dict(optimizer=dict(weight_decay=0.1))
