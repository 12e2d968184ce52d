//! A compiler from syscall rules to a classic-BPF seccomp program that finds the syscall by
//! binary search.
//!
//! Why not seccompiler's own compiler: it emits one comparison chain, syscall after syscall,
//! and the cost of that shape is paid at every sandbox start. When a filter is attached the
//! kernel runs it for every syscall number (per architecture) to learn which numbers are always
//! allowed (the seccomp action cache), so a chain of N instructions costs about N × 450 steps
//! per attach; the 1,222-instruction allowlist took ≈ 0.7 ms to attach here. A search tree over
//! the number ranges takes ~log2(ranges) comparisons per number, and the program is about a
//! third of the size (less to check and JIT-compile). The semantics are seccompiler's
//! (`SeccompFilter::new(rules, mismatch, match, arch)`); a test interprets both programs and
//! compares their answers.
//!
//! Layout of a program:
//! 1. the architecture check (anything else is killed: its syscall numbers mean other calls);
//! 2. the syscall number, then a tree of `jge` over the boundaries of ranges of numbers with
//!    the same outcome; each leaf returns, or jumps to the argument checks of one syscall;
//! 3. the argument checks: rules tried in order, each an AND of conditions; the first rule
//!    that holds returns the match action, none returns the mismatch action.

use std::collections::BTreeMap;

use seccompiler::sock_filter;

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h), class | size/op | source.
/// `BPF_LD | BPF_W | BPF_ABS`
const BPF_LD_W_ABS: u16 = 0x20;
/// `BPF_ALU | BPF_AND | BPF_K`
const BPF_ALU_AND_K: u16 = 0x54;
/// `BPF_JMP | BPF_JA`
const BPF_JMP_JA: u16 = 0x05;
/// `BPF_JMP | BPF_JEQ | BPF_K`
const BPF_JMP_JEQ_K: u16 = 0x15;
/// `BPF_JMP | BPF_JGE | BPF_K`
const BPF_JMP_JGE_K: u16 = 0x35;
/// `BPF_JMP | BPF_JGT | BPF_K`
const BPF_JMP_JGT_K: u16 = 0x25;
/// `BPF_JMP | BPF_JSET | BPF_K`
const BPF_JMP_JSET_K: u16 = 0x45;
/// `BPF_RET | BPF_K`
const BPF_RET_K: u16 = 0x06;

/// Offsets in `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARGS: u32 = 16;

/// The kernel reads at most this many instructions in one filter (BPF_MAXINSNS).
pub(crate) const INSTRUCTIONS_MAX: usize = 4096;

/// What the filter answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Allow,
    Errno(u16),
    KillProcess,
}

impl Action {
    fn ret(self) -> u32 {
        match self {
            Action::Allow => libc::SECCOMP_RET_ALLOW,
            Action::Errno(errno) => libc::SECCOMP_RET_ERRNO | u32::from(errno),
            Action::KillProcess => libc::SECCOMP_RET_KILL_PROCESS,
        }
    }
}

/// How much of an argument a condition compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Width {
    /// The low 32 bits.
    Dword,
    /// All 64 bits.
    Qword,
}

/// One comparison of an argument with a constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmp {
    Eq(u64),
    Ne(u64),
    /// `arg & mask == value`.
    MaskedEq {
        mask: u64,
        value: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cond {
    /// Argument index, 0..6.
    pub arg: u8,
    pub width: Width,
    pub cmp: Cmp,
}

/// Rules of one filter: per syscall number, the rules of which one must hold (each an AND of
/// conditions); an empty list means the syscall matches whatever its arguments.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub syscalls: BTreeMap<u32, Vec<Vec<Cond>>>,
    /// The answer for a syscall that matches.
    pub on_match: Action,
    /// The answer for any other syscall (and a listed one whose rules all fail).
    pub on_mismatch: Action,
    /// `AUDIT_ARCH_*` of the only architecture allowed; any other is killed.
    pub arch: u32,
}

/// Why rules could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CompileError {
    #[error("condition on argument {0}: syscalls have six")]
    BadArgument(u8),
    #[error("syscall {0}: an empty rule (a rule needs at least one condition)")]
    EmptyRule(u32),
    #[error("the program has {0} instructions, more than the kernel's {INSTRUCTIONS_MAX}")]
    TooLong(usize),
    #[error("a jump of {0} instructions inside the argument checks of syscall {1}")]
    JumpTooFar(usize, u32),
}

/// An instruction whose jump to an argument block is resolved once the blocks are placed.
enum Op {
    Insn(sock_filter),
    ToBlock(usize),
}

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// The offsets of the low and high 32 bits of argument `arg`.
fn arg_offsets(arg: u8) -> (u32, u32) {
    let base = DATA_ARGS + 8 * u32::from(arg);
    if cfg!(target_endian = "little") {
        (base, base + 4)
    } else {
        (base + 4, base)
    }
}

/// A leaf of the search tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Ret(Action),
    Block(usize),
}

/// Emits the search over `ranges` (sorted starts; each range runs to the next start).
fn emit_tree(ranges: &[(u32, Leaf)], out: &mut Vec<Op>) {
    if let [(_, leaf)] = ranges {
        out.push(match *leaf {
            Leaf::Ret(action) => Op::Insn(stmt(BPF_RET_K, action.ret())),
            Leaf::Block(block) => Op::ToBlock(block),
        });
        return;
    }
    let mid = ranges.len() / 2;
    let boundary = ranges[mid].0;
    let mut left = Vec::new();
    emit_tree(&ranges[..mid], &mut left);
    match u8::try_from(left.len()) {
        // jge boundary: true skips the left subtree to the right one.
        Ok(skip) => out.push(Op::Insn(jump(BPF_JMP_JGE_K, boundary, skip, 0))),
        Err(_) => {
            // Too far for an 8-bit offset: true falls on a 32-bit jump over the left subtree.
            out.push(Op::Insn(jump(BPF_JMP_JGE_K, boundary, 0, 1)));
            let skip = u32::try_from(left.len()).expect("a program is below 4096 instructions");
            out.push(Op::Insn(stmt(BPF_JMP_JA, skip)));
        }
    }
    out.extend(left);
    emit_tree(&ranges[mid..], out);
}

/// One condition's instructions; `fail` is written into the jumps taken when it does not hold
/// and is the distance from the end of these instructions to the failure target.
fn emit_cond(cond: &Cond, fail: usize, nr: u32) -> Result<Vec<sock_filter>, CompileError> {
    let (lo_at, hi_at) = arg_offsets(cond.arg);
    let lo = |v: u64| v as u32;
    let hi = |v: u64| (v >> 32) as u32;
    // Each part: load a half, optionally mask it, compare; listed with the low half last so
    // that a Qword is two Dword checks.
    let mut parts: Vec<(u32, Option<u32>, u32)> = Vec::new();
    let (mask, value, negate) = match cond.cmp {
        Cmp::Eq(v) => (None, v, false),
        Cmp::Ne(v) => (None, v, true),
        Cmp::MaskedEq { mask, value } => (Some(mask), value, false),
    };
    if cond.width == Width::Qword {
        parts.push((hi_at, mask.map(hi), hi(value)));
    }
    parts.push((lo_at, mask.map(lo), lo(value)));
    let part_len = |p: &(u32, Option<u32>, u32)| if p.1.is_some() { 3 } else { 2 };
    let total: usize = parts.iter().map(part_len).sum();
    let mut out = Vec::with_capacity(total);
    for (i, part) in parts.iter().enumerate() {
        out.push(stmt(BPF_LD_W_ABS, part.0));
        if let Some(mask) = part.1 {
            out.push(stmt(BPF_ALU_AND_K, mask));
        }
        // Distance from the instruction after this jump to the end of the condition.
        let rest = total - out.len() - 1;
        let to_fail =
            u8::try_from(rest + fail).map_err(|_| CompileError::JumpTooFar(rest + fail, nr))?;
        let last = i + 1 == parts.len();
        out.push(if !negate {
            // Equal: go on (to the next part, or past the condition). Not equal: fail.
            jump(BPF_JMP_JEQ_K, part.2, 0, to_fail)
        } else if last {
            // Every part equal means the arguments are equal: fail; else the condition holds.
            jump(BPF_JMP_JEQ_K, part.2, to_fail, 0)
        } else {
            // A high half that differs already makes the values differ: skip to the end.
            let to_end = u8::try_from(rest).map_err(|_| CompileError::JumpTooFar(rest, nr))?;
            jump(BPF_JMP_JEQ_K, part.2, 0, to_end)
        });
    }
    Ok(out)
}

/// The argument checks of one syscall: each rule in order, then the mismatch.
fn emit_block(nr: u32, rules: &[Vec<Cond>], set: &Rules) -> Result<Vec<sock_filter>, CompileError> {
    let mut out = Vec::new();
    for rule in rules {
        if rule.is_empty() {
            return Err(CompileError::EmptyRule(nr));
        }
        let mut conds = Vec::with_capacity(rule.len());
        for cond in rule {
            if cond.arg >= 6 {
                return Err(CompileError::BadArgument(cond.arg));
            }
            conds.push(cond);
        }
        // Compile back to front: a failing condition jumps past the rest of the rule and its
        // return, to the next rule.
        let mut tail: Vec<sock_filter> = vec![stmt(BPF_RET_K, set.on_match.ret())];
        for cond in conds.iter().rev() {
            let mut code = emit_cond(cond, tail.len(), nr)?;
            code.extend(tail);
            tail = code;
        }
        out.extend(tail);
    }
    out.push(stmt(BPF_RET_K, set.on_mismatch.ret()));
    Ok(out)
}

/// Appends a range starting at `start` (at or after the last range's start), replacing a range
/// that starts there and merging with the previous one when the outcome is the same.
fn push_range(ranges: &mut Vec<(u32, Leaf)>, start: u32, leaf: Leaf) {
    if ranges.last().is_some_and(|(last, _)| *last == start) {
        ranges.pop();
    }
    if ranges.last().is_none_or(|(_, last)| *last != leaf) {
        ranges.push((start, leaf));
    }
}

/// `program` with `nr` on `arch` answered `errno` before it runs: the two filters one would
/// stack, as one program (a filter costs ≈ 40 µs to attach here before its size matters).
/// Every other number, and every other architecture, reaches `program` unchanged; jumps in
/// classic BPF are relative and forward, so prepending leaves `program`'s own intact.
pub(crate) fn errno_first(
    program: &[sock_filter],
    nr: u32,
    errno: u16,
    arch: u32,
) -> Vec<sock_filter> {
    let mut out = vec![
        stmt(BPF_LD_W_ABS, DATA_ARCH),
        // Another architecture: straight to `program`, which kills it.
        jump(BPF_JMP_JEQ_K, arch, 0, 3),
        stmt(BPF_LD_W_ABS, DATA_NR),
        jump(BPF_JMP_JEQ_K, nr, 0, 1),
        stmt(BPF_RET_K, Action::Errno(errno).ret()),
    ];
    out.extend_from_slice(program);
    out
}

/// Compiles `set` into a program ready for `seccomp(SECCOMP_SET_MODE_FILTER)`.
pub(crate) fn compile(set: &Rules) -> Result<Vec<sock_filter>, CompileError> {
    let mut blocks: Vec<Vec<sock_filter>> = Vec::new();
    let mismatch = Leaf::Ret(set.on_mismatch);
    let mut ranges: Vec<(u32, Leaf)> = vec![(0, mismatch)];
    for (nr, rules) in &set.syscalls {
        let leaf = if rules.is_empty() {
            Leaf::Ret(set.on_match)
        } else {
            blocks.push(emit_block(*nr, rules, set)?);
            Leaf::Block(blocks.len() - 1)
        };
        // A range for this number, then the mismatch from the next number on.
        push_range(&mut ranges, *nr, leaf);
        if let Some(next) = nr.checked_add(1) {
            push_range(&mut ranges, next, mismatch);
        }
    }

    let mut ops = vec![
        Op::Insn(stmt(BPF_LD_W_ABS, DATA_ARCH)),
        Op::Insn(jump(BPF_JMP_JEQ_K, set.arch, 1, 0)),
        Op::Insn(stmt(BPF_RET_K, Action::KillProcess.ret())),
        Op::Insn(stmt(BPF_LD_W_ABS, DATA_NR)),
    ];
    emit_tree(&ranges, &mut ops);

    let mut block_starts = Vec::with_capacity(blocks.len());
    let mut at = ops.len();
    for block in &blocks {
        block_starts.push(at);
        at += block.len();
    }
    if at > INSTRUCTIONS_MAX {
        return Err(CompileError::TooLong(at));
    }
    let mut program: Vec<sock_filter> = ops
        .into_iter()
        .enumerate()
        .map(|(pos, op)| match op {
            Op::Insn(insn) => insn,
            Op::ToBlock(block) => {
                let offset = block_starts[block] - (pos + 1);
                stmt(
                    BPF_JMP_JA,
                    u32::try_from(offset).expect("a program is below 4096 instructions"),
                )
            }
        })
        .collect();
    for block in blocks {
        program.extend(block);
    }
    Ok(program)
}

/// Runs a classic-BPF seccomp program on one syscall, as the kernel would; for tests, and for
/// checking a program before it is installed. Returns the action word, or `None` for a program
/// that reads out of bounds, jumps out of the program or ends without a return.
pub(crate) fn interpret(
    program: &[sock_filter],
    nr: u32,
    arch: u32,
    args: [u64; 6],
) -> Option<u32> {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&nr.to_ne_bytes());
    data[4..8].copy_from_slice(&arch.to_ne_bytes());
    for (i, arg) in args.iter().enumerate() {
        let at = 16 + 8 * i;
        data[at..at + 8].copy_from_slice(&arg.to_ne_bytes());
    }
    let mut acc: u32 = 0;
    let mut pc = 0usize;
    // Classic BPF only jumps forward, so a run takes at most one pass.
    while let Some(insn) = program.get(pc) {
        pc += 1;
        match insn.code {
            BPF_LD_W_ABS => {
                let at = usize::try_from(insn.k).ok()?;
                let word = data.get(at..at + 4)?;
                acc = u32::from_ne_bytes(word.try_into().ok()?);
            }
            BPF_ALU_AND_K => acc &= insn.k,
            BPF_JMP_JA => pc += usize::try_from(insn.k).ok()?,
            BPF_JMP_JEQ_K | BPF_JMP_JGE_K | BPF_JMP_JGT_K | BPF_JMP_JSET_K => {
                let holds = match insn.code {
                    BPF_JMP_JEQ_K => acc == insn.k,
                    BPF_JMP_JGE_K => acc >= insn.k,
                    BPF_JMP_JGT_K => acc > insn.k,
                    _ => acc & insn.k != 0,
                };
                pc += usize::from(if holds { insn.jt } else { insn.jf });
            }
            BPF_RET_K => return Some(insn.k),
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARCH: u32 = 0xC000_003E;

    fn rules(syscalls: BTreeMap<u32, Vec<Vec<Cond>>>) -> Rules {
        Rules {
            syscalls,
            on_match: Action::Allow,
            on_mismatch: Action::Errno(1),
            arch: ARCH,
        }
    }

    fn run(program: &[sock_filter], nr: u32, args: [u64; 6]) -> u32 {
        interpret(program, nr, ARCH, args).expect("program returns")
    }

    #[test]
    fn unconditional_syscalls_are_found_by_number() {
        let set = rules(
            [0, 1, 2, 7, 100, 101, 300]
                .into_iter()
                .map(|n| (n, vec![]))
                .collect(),
        );
        let program = compile(&set).expect("compiles");
        let allow = libc::SECCOMP_RET_ALLOW;
        let deny = libc::SECCOMP_RET_ERRNO | 1;
        for nr in 0..400 {
            let want = if set.syscalls.contains_key(&nr) {
                allow
            } else {
                deny
            };
            assert_eq!(run(&program, nr, [0; 6]), want, "syscall {nr}");
        }
        assert_eq!(run(&program, u32::MAX, [0; 6]), deny);
        assert_eq!(run(&program, 0x4000_0000, [0; 6]), deny);
        // Another architecture is killed before the number is looked at.
        assert_eq!(
            interpret(&program, 0, 0x4000_0003, [0; 6]),
            Some(libc::SECCOMP_RET_KILL_PROCESS)
        );
    }

    #[test]
    fn argument_rules_are_ored_and_conditions_anded() {
        let eq = |arg, v| Cond {
            arg,
            width: Width::Dword,
            cmp: Cmp::Eq(v),
        };
        let set = rules(BTreeMap::from([(
            41,
            vec![
                vec![eq(0, 1)],
                vec![
                    eq(0, 2),
                    Cond {
                        arg: 1,
                        width: Width::Dword,
                        cmp: Cmp::MaskedEq {
                            mask: 0xf,
                            value: 1,
                        },
                    },
                ],
            ],
        )]));
        let program = compile(&set).expect("compiles");
        let allow = libc::SECCOMP_RET_ALLOW;
        let deny = libc::SECCOMP_RET_ERRNO | 1;
        assert_eq!(run(&program, 41, [1, 99, 0, 0, 0, 0]), allow);
        assert_eq!(run(&program, 41, [2, 0x801, 0, 0, 0, 0]), allow);
        assert_eq!(run(&program, 41, [2, 2, 0, 0, 0, 0]), deny);
        assert_eq!(run(&program, 41, [3, 1, 0, 0, 0, 0]), deny);
        // A Dword condition looks at the low half only.
        assert_eq!(run(&program, 41, [(7 << 32) | 1, 0, 0, 0, 0, 0]), allow);
    }

    #[test]
    fn qword_conditions_compare_both_halves() {
        let set = rules(BTreeMap::from([
            (
                56,
                vec![vec![Cond {
                    arg: 0,
                    width: Width::Qword,
                    cmp: Cmp::MaskedEq {
                        mask: 0x1_0000_00f0,
                        value: 0,
                    },
                }]],
            ),
            (
                57,
                vec![vec![Cond {
                    arg: 2,
                    width: Width::Qword,
                    cmp: Cmp::Ne(0x5_0000_0001),
                }]],
            ),
        ]));
        let program = compile(&set).expect("compiles");
        let allow = libc::SECCOMP_RET_ALLOW;
        let deny = libc::SECCOMP_RET_ERRNO | 1;
        assert_eq!(run(&program, 56, [0x0f, 0, 0, 0, 0, 0]), allow);
        assert_eq!(run(&program, 56, [0x10, 0, 0, 0, 0, 0]), deny);
        assert_eq!(run(&program, 56, [0x1_0000_0000, 0, 0, 0, 0, 0]), deny);
        assert_eq!(run(&program, 57, [0, 0, 0x5_0000_0001, 0, 0, 0]), deny);
        assert_eq!(run(&program, 57, [0, 0, 0x1, 0, 0, 0]), allow);
        assert_eq!(run(&program, 57, [0, 0, 0x5_0000_0000, 0, 0, 0]), allow);
    }

    #[test]
    fn deep_trees_use_long_jumps() {
        // Every other number allowed: about 2,000 ranges, far beyond an 8-bit jump.
        let set = rules((0..2000).step_by(2).map(|n| (n, vec![])).collect());
        let program = compile(&set).expect("compiles");
        for nr in 0..2010 {
            let want = if nr < 2000 && nr % 2 == 0 {
                libc::SECCOMP_RET_ALLOW
            } else {
                libc::SECCOMP_RET_ERRNO | 1
            };
            assert_eq!(run(&program, nr, [0; 6]), want, "syscall {nr}");
        }
    }

    #[test]
    fn bad_rules_are_refused() {
        let bad_arg = rules(BTreeMap::from([(
            1,
            vec![vec![Cond {
                arg: 6,
                width: Width::Dword,
                cmp: Cmp::Eq(0),
            }]],
        )]));
        assert_eq!(compile(&bad_arg).err(), Some(CompileError::BadArgument(6)));
        let empty = rules(BTreeMap::from([(1, vec![vec![]])]));
        assert_eq!(compile(&empty).err(), Some(CompileError::EmptyRule(1)));
    }
}
