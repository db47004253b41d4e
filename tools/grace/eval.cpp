// `grace eval`: replay a trace through a plan under a routing policy and a communication scheme, price it with
// a hardware model, write REPORT.json + REPORT.csv and print a short table.
#include "grace/eval.hpp"

#include <iostream>

#include "command.hpp"
#include "eval_modes.hpp"
#include "grace/engine_eval.hpp"
#include "grace/error.hpp"
#include "grace/hardware.hpp"
#include "grace/io.hpp"
#include "grace/plan.hpp"
#include "grace/stats.hpp"
#include "grace/trace.hpp"
#include "model_flags.hpp"

namespace grace::cli {
namespace {

struct EvalArgs {
    std::string trace, plan, routing, comm, hardware = "a100-testbed", output, topology, model_config, engine, stats;
    int slots_per_gpu = 0, layer_offset = 0;
    TraceOverrides overrides;
    std::optional<int> experts;
    std::optional<int> hidden, intermediate;
    int threads = 0;
    int64_t chunk = 1 << 16;
    int64_t batch_tokens = 0;  // 0 = unset
    std::string workload;
    AdaptationOptions adapt;           // --adapt N (eval_modes.hpp)
    std::string switch_plan;           // --switch-plan PLAN2
    std::optional<int64_t> switch_at;  // --switch-at TOKEN
    int weight_bytes = 0;              // --weight-bytes (migration); 0 = the model's
};

int run_eval(const EvalArgs& a) {
    // Cheap checks first, so a typo fails before any file is read.
    EvalOptions opt;
    opt.scheme = parse_comm_scheme(a.comm);
    if (!a.routing.empty()) opt.replay.policy = parse_routing_policy(a.routing);
    std::optional<Engine> engine;
    if (!a.engine.empty()) {
        engine = parse_engine(a.engine);
        if (!opt.replay.policy) opt.replay.policy = engine_policy(*engine);
        check_engine_policy(*engine, *opt.replay.policy);
    }
    GRACE_CHECK_ARG(engine || (a.stats.empty() && a.slots_per_gpu == 0 && a.layer_offset == 0),
                    "--stats, --slots-per-gpu and --layer-offset describe an engine deployment: they need --engine");
    GRACE_CHECK_ARG(a.layer_offset >= 0, "--layer-offset must be >= 0, got ", a.layer_offset);
    GRACE_CHECK_ARG(a.slots_per_gpu >= 0, "--slots-per-gpu must be >= 1, got ", a.slots_per_gpu);
    a.adapt.validate();
    GRACE_CHECK_ARG(a.adapt.interval > 0 || (a.adapt.batch_tokens == AdaptationOptions{}.batch_tokens &&
                                             a.adapt.decay == AdaptationOptions{}.decay),
                    "--adapt-batch-tokens and --adapt-decay need --adapt N");
    GRACE_CHECK_ARG(a.switch_plan.empty() == !a.switch_at,
                    a.switch_at ? "--switch-at needs --switch-plan PLAN2" : "--switch-plan needs --switch-at TOKEN");
    GRACE_CHECK_ARG(a.weight_bytes == 0 || !a.switch_plan.empty(), "--weight-bytes ", a.weight_bytes,
                    " prices a plan switch: it needs --switch-plan PLAN2");
    opt.replay.num_threads = a.threads;
    opt.batching.batch_tokens = a.batch_tokens;
    if (!a.workload.empty()) opt.batching.workload = parse_workload(a.workload);
    opt.hardware = load_hardware(a.hardware);
    if (a.hidden) opt.hardware.hidden = *a.hidden;
    if (a.intermediate) opt.hardware.intermediate = *a.intermediate;
    check_output_dir(a.output + ".json");
    const std::optional<ModelConfig> model = explicit_model(a.model_config, a.overrides.model);
    ExpertPlan plan = load_plan(a.plan);
    if (!a.topology.empty()) {
        const Topology want = Topology::parse(a.topology);
        GRACE_CHECK_INPUT(want.nodes == plan.topology.nodes && want.gpus_per_node == plan.topology.gpus_per_node,
                          "the plan is for topology ", plan.topology.to_string(), " but --topology is ", a.topology);
    }
    TraceOverrides ov = a.overrides;
    if (a.experts) ov.num_experts = a.experts;
    TraceReader reader(a.trace, ov);
    reader.set_validation(false);  // Replayer::consume checks every id while replaying it, with the same errors
    GRACE_CHECK_INPUT(plan.num_experts == reader.num_experts(), "the plan has ", plan.num_experts,
                      " experts but the trace has ", reader.num_experts());
    GRACE_CHECK_INPUT(plan.num_layers == reader.num_layers(), "the plan has ", plan.num_layers,
                      " layers but the trace has ", reader.num_layers());
    GRACE_CHECK_INPUT(plan.top_k == reader.top_k(), "the plan has top_k = ", plan.top_k,
                      " but the trace has top_k = ", reader.top_k());
    ModelShape shape;
    if (model) {
        shape = explicit_model_shape(opt.hardware, *model);
    } else {
        try {
            shape = resolve_model_shape(opt.hardware, reader.model());
        } catch (const Error& e) {
            throw Error(e.code(), std::string(e.what()) + ", or --hidden and --intermediate");
        }
    }
    check_model_shape(shape, reader.num_experts(), reader.num_layers(), "the trace");
    if (engine) {
        // What the engine loads: grace export's map (padded as `grace export --stats` pads it), routed its way.
        std::vector<double> load;
        if (!a.stats.empty()) {
            const RoutingStats st = load_stats(a.stats);
            GRACE_CHECK_INPUT(st.num_experts == plan.num_experts && st.num_layers == plan.num_layers, "statistics ",
                              a.stats, " have E=", st.num_experts, " L=", st.num_layers,
                              " but the plan has E=", plan.num_experts, " L=", plan.num_layers);
            load.assign(st.load.begin(), st.load.end());
        }
        EngineDeployment dep = deploy_to_engine(plan, *opt.replay.policy, load, a.slots_per_gpu, a.layer_offset);
        std::cout << "in " << a.engine << ": " << dep.map.num_gpus << " GPUs x " << dep.map.slots_per_gpu
                  << " slots = " << dep.map.num_physical() << " physical experts, " << dep.map.num_padded
                  << " padding replicas, routing " << to_string(*opt.replay.policy) << "\n";
        dep.plan.method = plan.method + "@" + a.engine;
        plan = std::move(dep.plan);
        opt.replay.slot_maps = std::move(dep.slot_maps);
    }
    if (a.adapt.interval > 0 || !a.switch_plan.empty()) {
        // Both replay the trace out of order or in parts: they read it whole.
        GRACE_CHECK_ARG(!engine, "--adapt and --switch-plan do not combine with --engine");
        GRACE_CHECK_ARG(a.adapt.interval == 0 || a.switch_plan.empty(), "--adapt and --switch-plan do not combine");
        GRACE_CHECK_ARG(a.batch_tokens == 0 && a.workload.empty(),
                        "--adapt and --switch-plan do not combine with --batch-tokens or --workload (--adapt has its "
                        "own per-GPU batches: --adapt-batch-tokens)");
        RoutingTrace trace;
        reader.next(reader.num_tokens(), trace);
        if (a.adapt.interval > 0) return eval_adaptive(trace, plan, opt, shape, a.adapt, a.output);
        const ExpertPlan plan2 = load_plan(a.switch_plan);
        const int wb = a.weight_bytes > 0 ? a.weight_bytes : model && model->dtype_bytes > 0 ? model->dtype_bytes : 2;
        return eval_switch(trace, plan, plan2, opt, shape, *a.switch_at, 3.0 * shape.hidden * shape.intermediate * wb,
                           a.plan + " -> " + a.switch_plan, a.output);
    }
    // Each batch of the schedule is priced on its own; by default the whole trace is one batch.
    const BatchSchedule schedule = make_batch_schedule(reader.num_tokens(), opt.batching);
    BatchedEval batched(plan, schedule, {opt.scheme}, opt.hardware, shape, opt.replay);
    Progress progress("replaying trace", schedule.num_tokens());
    RoutingTrace chunk;
    int64_t first = 0, next = 0;
    // Tokens after the schedule's (a workload's partial round) are not read.
    while (!batched.done() && reader.next(std::min(a.chunk, schedule.num_tokens() - next), chunk, &first)) {
        batched.consume(chunk, first);
        next = first + chunk.num_tokens;
        progress.update(next);
    }
    progress.finish();
    EvalReport report = batched.report();
    report.dataset = reader.dataset();
    report.policy = routing_label(plan, opt.replay.policy);
    save_report(report, a.output);
    std::cout << format_report_table(report);
    std::cout << "wrote " << a.output << ".json and " << a.output << ".csv\n";
    return 0;
}

GRACE_COMMAND(
    "eval", "Replay a trace through a plan and price its traffic and time (spec §5-§7)",
    [](CLI::App& sub) -> std::function<int()> {
        auto a = std::make_shared<EvalArgs>();
        sub.add_option("--trace", a->trace, "Routing trace .npy [T, L, k] (metadata .json beside it)")->required();
        add_trace_flags(sub, a->overrides, a->experts);
        sub.add_option("--plan", a->plan, "Plan file (grace.plan/v1 JSON)")->required();
        sub.add_option("--routing", a->routing,
                       "Routing policy: primary, wrr, tar, vllm, sglang-static, sglang-dynamic, sglang-nearest, "
                       "vllm-ascend, trtllm (default: the plan's; with --engine, the engine's)")
            ->check(parsed_by([](const std::string& p) { parse_routing_policy(p); }, "POLICY"));
        sub.add_option("--engine", a->engine,
                       "Evaluate the plan as this engine runs its export: sglang, vllm, vllm-ascend, trtllm "
                       "(placement padded as grace export does, the engine's own replica choice)")
            ->check(CLI::IsMember({"sglang", "vllm", "vllm-ascend", "trtllm"}));
        sub.add_option("--stats", a->stats,
                       "With --engine: statistics folder whose loads choose the padding replicas (as grace export)");
        sub.add_option("--slots-per-gpu", a->slots_per_gpu,
                       "With --engine: the engine's slots per GPU, (E + redundant experts) / G (default: the "
                       "plan's largest instance count, as grace export)")
            ->check(integer_in<int>(1));
        sub.add_option("--layer-offset", a->layer_offset,
                       "With --engine: model layer index of MoE layer 0, as given to grace export (SGLang's static "
                       "dispatch draws over the dense layers' rows too)")
            ->check(integer_in<int>(0, 10000));
        sub.add_option("--comm", a->comm, "Communication scheme: flat, flat-dedup, 2dh, hsc")
            ->required()
            ->check(parsed_by([](const std::string& s) { parse_comm_scheme(s); }, "SCHEME"));
        sub.add_option(
               "--hardware", a->hardware,
               "Hardware preset (a100-testbed, h100-ib, h100-measured, h100-sm90) or grace.hardware/v1 JSON file")
            ->capture_default_str()
            ->check(hardware_value());
        sub.add_option("--hidden", a->hidden, "Hidden size H (default: hardware file, else the model preset)")
            ->check(integer_in<int>(1));
        sub.add_option("--intermediate", a->intermediate, "Expert intermediate size I (default: as --hidden)")
            ->check(integer_in<int>(1));
        add_model_config_flag(sub, a->model_config);
        sub.add_option("--topology", a->topology, "Expected topology NxM; an error if the plan's differs")
            ->check(topology_value());
        sub.add_option("--threads", a->threads, "Threads (0 = all); results are identical for any count")
            ->check(thread_count());
        sub.add_option("--chunk", a->chunk, "Tokens read per chunk (memory bound)")
            ->capture_default_str()
            ->check(integer_in<int64_t>(1));
        sub.add_option("--batch-tokens", a->batch_tokens,
                       "Price the trace as consecutive batches of B tokens (the last one shorter), each a forward "
                       "pass of its own; with --workload, the prefill's batch size (default: the whole trace, or "
                       "a workload's whole prefill, is one batch)")
            ->check(integer_in<int64_t>(1));
        sub.add_option("--workload", a->workload,
                       "Serving workload SxP+D: S sequences x P prefill tokens + D decode steps of S tokens, taken "
                       "in trace order, repeated for every whole round the trace holds (e.g. 256x128+16, "
                       "512x64+32; docs/eval.md)")
            ->check(parsed_by([](const std::string& w) { parse_workload(w); }, "SxP+D"));
        sub.add_option(
               "--adapt", a->adapt.interval,
               "Re-predict the WRR weights (Equation 4) from the observed counts every N batches (docs/eval.md)")
            ->check(integer_in<int>(1));
        sub.add_option("--adapt-batch-tokens", a->adapt.batch_tokens,
                       "With --adapt: tokens per GPU per batch, as grace run --batch-tokens")
            ->capture_default_str()
            ->check(integer_in<int64_t>(1));
        sub.add_option("--adapt-decay", a->adapt.decay,
                       "With --adapt: weight of the older history in [0, 1) (0 = the last N batches only)")
            ->capture_default_str()
            ->check(adapt_decay_value());
        sub.add_option("--switch-plan", a->switch_plan,
                       "Switch to this plan (same E, L, k and topology) at --switch-at; reports the migration cost");
        sub.add_option("--switch-at", a->switch_at, "With --switch-plan: first token served by the new plan")
            ->check(integer_in<int64_t>(1));
        sub.add_option("--weight-bytes", a->weight_bytes,
                       "With --switch-plan: bytes per expert weight element (default: the model config's, else 2)")
            ->check(integer_in<int>(1, 8));
        sub.add_option("-o,--output", a->output, "Report stem: writes REPORT.json and REPORT.csv")->required();
        return [a] { return run_eval(*a); };
    },
    40);

}  // namespace
}  // namespace grace::cli
