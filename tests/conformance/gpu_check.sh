# GPU check of the harness against impl on CUDA (run by hand on a GPU machine: bash tests/conformance/gpu_check.sh)
set -x
S=/tmp/site; mkdir -p $S/qwen25vl $S/avstub/av
cp qwen25vl/__init__.py $S/qwen25vl/
for d in spec impl conformance tools; do ln -sfn $PWD/$d $S/qwen25vl/$d; done
python3 -c "import av" 2>/dev/null || { echo '__version__ = "stub (frame lists only)"' > $S/avstub/av/__init__.py; EXTRA=:$S/avstub; }
export PYTHONPATH=$S$EXTRA PYTHONUNBUFFERED=1
cd /tmp  # not the repo root: its qwen25vl/ folder would shadow the assembled package
python3 -c "import torch, transformers, PIL; print(torch.__version__, transformers.__version__, PIL.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
for dt in default float32 float16; do
  a=""; [ $dt != default ] && a="--dtype $dt"
  python3 -m qwen25vl conform $a --json ${OUT:-/tmp}/impl_$dt.json > ${OUT:-/tmp}/impl_$dt.txt 2>&1; echo "impl $dt exit $?"; tail -3 ${OUT:-/tmp}/impl_$dt.txt
done
python3 -m qwen25vl conform --teacher-forced all --cases model_image --json ${OUT:-/tmp}/impl_tf.json > ${OUT:-/tmp}/impl_tf.txt 2>&1; echo "impl teacher-forced exit $?"; tail -3 ${OUT:-/tmp}/impl_tf.txt
nvidia-smi --query-gpu=name --format=csv,noheader
