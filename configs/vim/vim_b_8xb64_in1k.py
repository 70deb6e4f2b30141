# Vim-B: the repository ships no base training script; this is Vim-S's recipe applied to vim_b.
_base_ = ['./vim_s_8xb64_in1k.py']
model = dict(model_name='vim_b')
