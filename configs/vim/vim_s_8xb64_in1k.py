# Vim-S, the official recipe (vim/scripts/pt-vim-s.sh): 8 GPUs x 64, lr 1e-3 at 512 images,
# weight decay 0.05, drop path 0.05; otherwise as Vim-T.
_base_ = ['./vim_t_8xb128_in1k.py']
model = dict(model_name='vim_s', model_args=dict(drop_path_rate=0.05))
train_dataloader = dict(batch_size=64)
optim_wrapper = dict(optimizer=dict(lr=1e-3, weight_decay=0.05))
auto_scale_lr = dict(base_batch_size=512, enable=True)
