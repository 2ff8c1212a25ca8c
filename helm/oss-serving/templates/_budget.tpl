{{/*
GPU memory budget per model, the same arithmetic as serving/engine/budget.py on the
same table (files/budget.json, written by `python -m serving.engine.budget`).
tests/chart/test_budget_agreement.py renders both over a grid of layouts and compares.
Integers only (MiB, bytes, tokens); gpu_memory_utilization is applied with mulf
(decimal) and floored, as the Python side does with Decimal.
*/}}

{{/* Tenths of a GiB, floored toward zero, as "12.3". Input: MiB (int). */}}
{{- define "oss-serving.gib" -}}
{{- $tenths := div (mul (int .) 10) 1024 }}
{{- $sign := "" }}
{{- if lt $tenths 0 }}{{ $sign = "-" }}{{ $tenths = mul $tenths -1 }}{{ end }}
{{- printf "%s%d.%d" $sign (div $tenths 10) (mod $tenths 10) }}
{{- end }}

{{/* Model key of the table for a configured model, or "". */}}
{{- define "oss-serving.budgetModelKey" -}}
{{- $text := printf "%s %s" .model.source .model.name | lower | replace "_" "-" }}
{{- $found := "" }}
{{- range $key := keys .table.models | sortAlpha }}
{{- if and (not $found) (contains $key $text) }}{{ $found = $key }}{{ end }}
{{- end }}
{{- $found }}
{{- end }}

{{/*
Estimate one layout. Input: dict table, model (key), gpu, tp, dp, ep (bool), util,
maxLen (int or nil), kvDtype. Output: JSON object.
*/}}
{{- define "oss-serving.budgetEstimate" -}}
{{- $t := .table }}
{{- $spec := index $t.models .model }}
{{- $gpu := index $t.gpus .gpu }}
{{- $tp := int .tp }}
{{- $dp := 1 }}{{ if .ep }}{{ $dp = int .dp }}{{ end }}
{{- $problems := list }}
{{- if ne (mod (int $spec.numAttentionHeads) $tp) 0 }}
{{- $problems = append $problems (printf "tensor_parallel_size %d does not divide the %d attention heads" $tp (int $spec.numAttentionHeads)) }}
{{- end }}
{{- if and .ep (gt (mul $tp $dp) (int $spec.numExperts)) }}
{{- $problems = append $problems (printf "expert-parallel size %d exceeds the %d experts" (mul $tp $dp) (int $spec.numExperts)) }}
{{- end }}
{{- $expertMiB := sub (int $spec.weightsMiB) (int $spec.nonExpertWeightsMiB) }}
{{- $shards := $tp }}{{ if .ep }}{{ $shards = mul $tp $dp }}{{ end }}
{{- $weights := add (div (int $spec.nonExpertWeightsMiB) $tp) (div $expertMiB $shards) }}
{{- $usable := mulf (int $gpu.memoryMiB) .util | floor | int }}
{{- $reserve := int $t.reserveMiB }}
{{- $kvMiB := sub (sub $usable $weights) $reserve }}
{{- $kvHeads := max 1 (div (int $spec.numKvHeads) $tp) }}
{{- $elem := int (index $t.kvDtypeBytes .kvDtype) }}
{{- $perLayerToken := mul 2 $kvHeads (int $spec.headDim) $elem }}
{{- $perToken := mul (int $spec.fullAttentionLayers) $perLayerToken }}
{{- $maxLen := int $spec.maxContext }}{{ if .maxLen }}{{ $maxLen = int .maxLen }}{{ end }}
{{- $sliding := mul (int $spec.slidingLayers) $perLayerToken (min $maxLen (int $spec.slidingWindow)) }}
{{- $seq := add (mul $maxLen $perToken) $sliding }}
{{- $tokens := 0 }}{{ $conc := 0 }}
{{- if le $kvMiB 0 }}
{{- $problems = append $problems (printf "weights need %s GiB per GPU plus a %s GiB reserve, but only %s GiB of %s GiB are usable at gpu_memory_utilization %v: no room for the KV cache" (include "oss-serving.gib" $weights) (include "oss-serving.gib" $reserve) (include "oss-serving.gib" $usable) (include "oss-serving.gib" (int $gpu.memoryMiB)) .util) }}
{{- else }}
{{- $kvBytes := mul $kvMiB 1048576 }}
{{- $tokens = div $kvBytes $perToken }}
{{- $conc = div $kvBytes $seq }}
{{- if lt $conc 1 }}
{{- $longest := div (sub $kvBytes $sliding) $perToken }}
{{- $problems = append $problems (printf "the KV room of %s GiB per GPU holds %d tokens, less than one sequence of max_model_len %d (cap max_model_len at %d or below)" (include "oss-serving.gib" $kvMiB) $tokens $maxLen $longest) }}
{{- end }}
{{- end }}
{{- dict "fits" (eq (len $problems) 0) "weights_mib" $weights "usable_mib" $usable "kv_mib" $kvMiB "kv_tokens" $tokens "max_concurrency" $conc "max_model_len" $maxLen "problems" $problems | toJson }}
{{- end }}

{{/*
Check one configured model. Input: dict root (the chart context), model (an entry of
.Values.config.models). Output: JSON {checked, fits, message, ...estimate}.
*/}}
{{- define "oss-serving.budgetCheck" -}}
{{- $table := $.root.Files.Get "files/budget.json" | fromJson }}
{{- $m := .model }}
{{- $topo := default dict $m.topology }}
{{- $kw := default dict $m.engine_kwargs }}
{{- $key := include "oss-serving.budgetModelKey" (dict "table" $table "model" $m) }}
{{- if or (not $topo.gpu_type) (not $key) }}
{{- dict "checked" false "fits" true "model" $m.name | toJson }}
{{- else }}
{{- $gpuType := $topo.gpu_type }}
{{- if not (hasKey $table.gpus $gpuType) }}
{{- fail (printf "model %s: unknown topology.gpu_type %q; known: %s" $m.name $gpuType (keys $table.gpus | sortAlpha | join ", ")) }}
{{- end }}
{{- $kvDtype := toString (default "auto" $kw.kv_cache_dtype) }}
{{- if not (hasKey $table.kvDtypeBytes $kvDtype) }}
{{- fail (printf "model %s: unknown kv_cache_dtype %q; known: %s" $m.name $kvDtype (keys $table.kvDtypeBytes | sortAlpha | join ", ")) }}
{{- end }}
{{- $gpusPerNode := 0 }}
{{- range $.root.Values.ray.workerGroups }}
{{- if and (eq .gpuType $gpuType) (gt (int .gpusPerPod) $gpusPerNode) }}{{ $gpusPerNode = int .gpusPerPod }}{{ end }}
{{- end }}
{{- if eq $gpusPerNode 0 }}
{{- fail (printf "model %s: topology.gpu_type is %s but no entry of ray.workerGroups has gpuType %s" $m.name $gpuType $gpuType) }}
{{- end }}
{{- $tp := int (default 1 $topo.tensor_parallel_size) }}
{{- $dp := int (default 1 $topo.data_parallel_size) }}
{{- $ep := eq (default "replicas" $topo.kind) "expert_parallel" }}
{{- $util := default $table.defaultGpuMemoryUtilization $kw.gpu_memory_utilization }}
{{- $args := dict "table" $table "model" $key "gpu" $gpuType "tp" $tp "dp" $dp "ep" $ep "util" $util "maxLen" $kw.max_model_len "kvDtype" $kvDtype }}
{{- $est := include "oss-serving.budgetEstimate" $args | fromJson }}
{{- $problems := $est.problems }}
{{- if gt $tp $gpusPerNode }}
{{- $problems = append $problems (printf "tensor_parallel_size %d needs more GPUs than one node has (%d)" $tp $gpusPerNode) }}
{{- end }}
{{- $layoutName := printf "TP%d" $tp }}
{{- if $ep }}{{ $layoutName = printf "EP (TP%d x DP%d)" $tp $dp }}{{ end }}
{{- $message := "" }}
{{- if $problems }}
{{- $fits := list }}
{{- range $cand := $table.tpCandidates }}
{{- $c := int $cand }}
{{- if and (le $c $gpusPerNode) (or $ep (ne $c $tp)) }}
{{- $r := include "oss-serving.budgetEstimate" (merge (dict "tp" $c "ep" false "dp" 1) $args) | fromJson }}
{{- if $r.fits }}
{{- $fits = append $fits (printf "TP%d (%d KV tokens, max concurrency %d at max_model_len %d)" $c (int $r.kv_tokens) (int $r.max_concurrency) (int $r.max_model_len)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $advice := "; no tensor-parallel layout on this GPU fits" }}
{{- if $fits }}{{ $advice = printf "; layouts that fit: %s" (join ", " $fits) }}{{ end }}
{{- $message = printf "%s on %s %s does not fit: %s%s" $key $gpuType $layoutName (join "; " $problems) $advice }}
{{- end }}
{{- $_ := set $est "checked" true }}
{{- $_ := set $est "fits" (not $problems) }}
{{- $_ := set $est "message" $message }}
{{- $_ := set $est "model" $m.name }}
{{- $_ := set $est "layout" (printf "%s on %s %s" $key $gpuType $layoutName) }}
{{- $_ := set $est "gpus_per_node" $gpusPerNode }}
{{- toJson $est }}
{{- end }}
{{- end }}

{{/* Every model's budget as a JSON list; fails the render when one cannot fit. */}}
{{- define "oss-serving.budgets" -}}
{{- $out := list }}
{{- range .Values.config.models }}
{{- $r := include "oss-serving.budgetCheck" (dict "root" $ "model" .) | fromJson }}
{{- if and $.Values.budget.enforce (not $r.fits) }}
{{- fail (printf "GPU memory budget: model %s: %s" $r.model $r.message) }}
{{- end }}
{{- $out = append $out $r }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/*
Placement: the GPUs the models need at their minimum replica counts must fit the worker
groups of their GPU type at maxReplicas, and something must run the gateway (the head
has num-cpus 0, so at least one worker pod must stay up).
*/}}
{{- define "oss-serving.capacity" -}}
{{- $need := dict }}
{{- range .Values.config.models }}
{{- $topo := default dict .topology }}
{{- if and $topo.gpu_type (eq (default "cpu" $topo.accelerator) "gpu") }}
{{- $dp := 1 }}{{ if eq (default "replicas" $topo.kind) "expert_parallel" }}{{ $dp = int (default 1 $topo.data_parallel_size) }}{{ end }}
{{- $min := 1 }}{{ if hasKey $topo "min_replicas" }}{{ $min = int $topo.min_replicas }}{{ end }}
{{- $gpus := mul $min (int (default 1 $topo.tensor_parallel_size)) $dp }}
{{- $_ := set $need $topo.gpu_type (add (get $need $topo.gpu_type | default 0) $gpus) }}
{{- end }}
{{- end }}
{{- range $gpuType := keys $need | sortAlpha }}
{{- $have := 0 }}
{{- range $.Values.ray.workerGroups }}
{{- if eq .gpuType $gpuType }}{{ $have = add $have (mul (int .maxReplicas) (int .gpusPerPod) (int (default 1 .numOfHosts))) }}{{ end }}
{{- end }}
{{- if gt (int (get $need $gpuType)) (int $have) }}
{{- fail (printf "GPU capacity: the models on %s need %d GPUs at their min_replicas, but the worker groups with gpuType %s reach only %d at maxReplicas (maxReplicas x gpusPerPod)" $gpuType (int (get $need $gpuType)) $gpuType (int $have)) }}
{{- end }}
{{- end }}
{{- $alwaysUp := 0 }}
{{- range .Values.ray.workerGroups }}{{ $alwaysUp = add $alwaysUp (int .minReplicas) }}{{ end }}
{{- if eq (int $alwaysUp) 0 }}
{{- fail "GPU capacity: every worker group has minReplicas 0, so nothing could run the gateway (the head has num-cpus 0): keep minReplicas 1 on one group" }}
{{- end }}
{{- end }}
