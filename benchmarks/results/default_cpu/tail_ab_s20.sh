run() { # $1 tree $2 workdir
  cd "$2" && s=$(date +%s.%N) && PYTHONPATH=$1/src /work/main/.venv/bin/python -m snakemake -s $1/Snakefile -d $2 --cores 2 --resources gpu=0 --config experiment=default "overrides=[]" --forcerun scores -- results/default/smollm2/math__code/cells.csv > $2/tail.log 2>&1; e=$(date +%s.%N)
  L=$2/results/logs
  echo "$1 total $(echo "$e - $s" | bc) chunk $(grep -h 'finished in' $L/chunk_scores/default/smollm2/math__code/split0/chunk0.log | awk '{print $6}') scores $(grep -h 'finished in' $L/scores/default/smollm2/math__code/split0.log | awk '{print $6}') stats $(grep -h 'finished in' $L/stats/default/smollm2/math__code/split0.log | awk '{print $6}') tables $(grep -h 'finished in' $L/tables/default/smollm2/math__code.log | awk '{print $6}')"
}
for i in 1 2 3 4; do run /work/wt_base /tmp/wfbase; run /work/main /tmp/wfnew; done
