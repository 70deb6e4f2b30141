# Not an official configuration: RAVLT-S with RALA in every stage, trained with RAVLT-S's recipe.
_base_ = ['./ravlt_t_8xb128_in1k.py']
model = dict(model_name='ravlt_s_linear', model_args=dict(drop_path_rate=0.15))
