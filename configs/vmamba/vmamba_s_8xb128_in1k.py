_base_ = ['./vmamba_t_8xb128_in1k.py']
model = dict(model_name='vmamba_s', model_args=dict(drop_path_rate=0.3))
