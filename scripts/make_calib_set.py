#!/usr/bin/env python
"""Build dgemma's default NVFP4 calibration set: converter/calib/default.jsonl (+ LICENSE-PSF.txt).

Every record is {"prompt", "continuation", "kind", "source"} with kind in prose | code | chat:
- prose: paragraphs written for dgemma (English and a few other languages) and long docstrings of the Python
  standard library, split near the middle at a word boundary;
- code:  standard-library functions, prompt = signature + docstring (+ the first lines), continuation = rest;
- chat:  Gemma 4 turn format (`<|turn>user\\n...<turn|>\\n<|turn>model\\n` prompt, answer + `<turn|>`
  continuation; no <bos>, the tokenizer adds it): conversations written for dgemma, generated arithmetic
  word problems with worked answers, and questions about standard-library functions answered from their
  docstrings or source.

Deterministic: a fixed module list, sorted traversal and a seeded RNG. The standard-library text depends on
the interpreter's version; the committed file was made with CPython 3.11.7. Usage:
    python scripts/make_calib_set.py [--out converter/calib] [--check]
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import random
import sys
import sysconfig
import textwrap
from pathlib import Path

SEED = 20260601
TURN_USER = "<|turn>user\n"
TURN_MODEL = "<|turn>model\n"
TURN_SYSTEM = "<|turn>system\n"
END = "<turn|>"

# Pure-Python standard-library modules with good docstrings (paths relative to the stdlib folder).
MODULES = [
    "textwrap.py", "heapq.py", "bisect.py", "fractions.py", "statistics.py", "functools.py", "collections/__init__.py",
    "pathlib.py", "shutil.py", "string.py", "difflib.py", "calendar.py", "datetime.py", "random.py", "_pydecimal.py",
    "csv.py", "configparser.py", "enum.py", "dataclasses.py", "contextlib.py", "inspect.py", "ast.py",
    "tokenize.py", "pprint.py", "queue.py", "sched.py", "secrets.py", "shlex.py", "tempfile.py", "threading.py",
    "timeit.py", "typing.py", "uuid.py", "urllib/parse.py", "zipfile.py", "base64.py", "colorsys.py", "copy.py",
    "fnmatch.py", "glob.py", "gzip.py", "hmac.py", "ipaddress.py", "json/__init__.py", "json/decoder.py",
    "json/encoder.py", "locale.py", "logging/__init__.py", "mimetypes.py", "numbers.py", "optparse.py",
    "argparse.py", "platform.py", "plistlib.py", "quopri.py", "reprlib.py", "subprocess.py", "tarfile.py",
    "traceback.py", "unittest/case.py", "warnings.py", "weakref.py", "graphlib.py", "getopt.py", "gettext.py",
    "filecmp.py", "codecs.py", "cmd.py", "bdb.py", "abc.py", "asyncio/tasks.py", "asyncio/queues.py",
    "email/utils.py", "http/cookies.py", "html/__init__.py", "imaplib.py", "smtplib.py", "socketserver.py",
    "selectors.py", "sre_parse.py", "pickle.py", "os.py", "posixpath.py", "trace.py", "pydoc.py", "doctest.py",
]

# ---- text written for dgemma (Apache-2.0, like the rest of the project) -----------------------------------

PROSE = [
    "The lighthouse on the northern cape was automated decades ago, but the keeper's cottage still stands beside "
    "it, its windows shuttered against the salt wind. Every autumn a handful of volunteers climb the hill to repaint "
    "the iron railings and replace the glass that winter storms have cracked. They bring thermoses of tea and stay "
    "until the lamp comes on, a slow white sweep that reaches nineteen nautical miles out to sea. Fishermen who grew "
    "up in the village say they can tell the season by the colour of the beam through the fog: pale and sharp in "
    "January, softer and almost golden in the long evenings of July. Nobody has lived in the cottage since 1974, yet "
    "the garden behind it keeps producing rhubarb, as if someone were still expected home for supper.",
    "Sourdough bread depends on a stable community of wild yeasts and lactic acid bacteria. The yeasts produce the "
    "carbon dioxide that raises the dough, while the bacteria generate lactic and acetic acids that give the crumb "
    "its tang and slow down staling. A starter kept at room temperature and fed twice a day becomes vigorous and "
    "mild; one kept in the refrigerator and fed weekly turns sharper, because acetic acid accumulates at lower "
    "temperatures. Bakers control the final flavour mostly through time: a long, cool bulk fermentation deepens the "
    "sourness, and a short, warm one keeps the loaf sweet. Hydration matters as well. A wetter dough ferments faster "
    "and yields an open, irregular crumb, but it is harder to shape and needs a strong gluten network built by "
    "folding rather than kneading.",
    "When engineers talk about the reliability of a system, they often mean two different things. The first is "
    "availability: the fraction of time the system answers requests at all. The second is correctness: whether the "
    "answers it gives are right. A cache that serves stale data during an outage improves availability at the cost "
    "of correctness, and a database that refuses writes until a quorum of replicas agrees does the opposite. Neither "
    "choice is wrong in general. What goes wrong is making the choice implicitly, so that a team discovers during an "
    "incident which of the two properties its design actually protects. Writing the trade-off down, with the "
    "expected failure modes and what users will see in each, is cheap compared with learning it at three in the "
    "morning.",
    "Migratory birds navigate with a combination of cues. Young songbirds on their first journey rely largely on an "
    "inherited compass direction and a rough sense of how long to fly; experienced adults also use landmarks, the "
    "position of the setting sun and the pattern of stars around the celestial pole. Many species can sense the "
    "Earth's magnetic field, and experiments in which the field around caged birds is rotated show that they "
    "reorient their restless hopping accordingly. The mechanism is still debated. One hypothesis involves light-"
    "sensitive proteins in the retina whose chemical reactions depend on the orientation of the magnetic field, which "
    "would mean that, in some sense, the birds see magnetic north as a faint pattern laid over their vision.",
    "The old map showed the river running straight through the valley, but the surveyors who made it had never "
    "walked the lower reaches. In reality the water loops back on itself three times before it reaches the lake, "
    "cutting oxbows into the meadow and leaving behind crescent-shaped ponds where herons wait in the reeds. Hikers "
    "who trust the map expect a two-hour walk and find themselves still wading through tall grass at dusk. The "
    "local council has talked for years about printing a corrected edition. In the meantime, the owner of the "
    "village shop hands out a photocopy with the bends drawn in by hand, along with a warning to carry a torch and "
    "to keep the river on the left on the way back.",
    "A good explanation starts from what the listener already knows. If someone understands how a bank account "
    "accrues interest, compound growth can be introduced as interest earning interest, and only later written as an "
    "exponential function. If they have cooked rice, the idea of a phase transition can begin with water that stops "
    "getting hotter while it boils. Teachers sometimes skip this step because the formal definition feels more "
    "honest, but a definition with no anchor is quickly forgotten. The reverse mistake is to stay with the analogy "
    "too long, until the learner believes the model is the thing itself. The craft lies in choosing the moment to "
    "let go of the picture and show where it breaks.",
    "On the first morning of the expedition the team woke to find the tents buried to their roofs. The wind had "
    "dropped during the night and the snow fell straight down, heavy and silent, so that nobody heard it arrive. "
    "Digging out took three hours. By noon the sky had cleared to a hard, brilliant blue and the peak they had come "
    "to climb stood above the glacier as if it had been cut from paper. The leader decided to wait a day for the new "
    "snow to settle. Some of the younger climbers grumbled, but that evening they watched a slab avalanche peel off "
    "the exact slope they would have crossed, and nobody complained again.",
    "Spreadsheets are the most widely used programming environment in the world, although few of their users "
    "would describe themselves as programmers. A cell that computes a total from a column of numbers is a small "
    "function; a sheet that references another sheet is a module with dependencies. The strengths of the model are "
    "immediate feedback and visible state: change an input and every dependent value updates in front of you. Its "
    "weaknesses are the ones programmers know from large codebases without tests. Formulas are copied and then "
    "silently diverge, ranges stop one row short of the data, and nobody can say which numbers in the quarterly "
    "report depend on the hard-coded exchange rate someone typed in two years ago.",
    "Photosynthesis converts light energy into chemical energy in two linked stages. In the light-dependent "
    "reactions, which take place in the thylakoid membranes of the chloroplast, pigments absorb photons and use "
    "their energy to split water, releasing oxygen and producing ATP and the electron carrier NADPH. In the Calvin "
    "cycle, which runs in the surrounding stroma, the enzyme RuBisCO fixes carbon dioxide onto a five-carbon sugar, "
    "and the ATP and NADPH from the first stage drive the reduction of the products into three-carbon sugars. "
    "RuBisCO is slow and sometimes binds oxygen instead of carbon dioxide, a wasteful side reaction that several "
    "plant lineages have evolved to suppress by concentrating carbon dioxide around the enzyme.",
    "The committee met every Thursday in a room that was always either too hot or too cold. The agenda rarely "
    "changed: the budget, the building works, any other business. Over the years the members had developed an "
    "elaborate etiquette for disagreeing without appearing to. One would say that a proposal was interesting, which "
    "meant it was doomed; another would ask whether there had been sufficient consultation, which meant he had not "
    "been consulted. New members took about six months to learn the code. The secretary, who had taken the minutes "
    "for eleven years, could translate any remark instantly, and privately kept a second set of notes recording what "
    "everyone had actually meant.",
    "Floating-point numbers trade exactness for range. A 32-bit float stores a sign, an eight-bit exponent and a "
    "23-bit fraction, so it can represent values from about ten to the minus thirty-eight up to ten to the thirty-"
    "eight, but only about seven significant decimal digits at any scale. Addition is not associative: adding a tiny "
    "number to a huge one may leave the huge one unchanged, so the order of a long sum changes its result. Numerical "
    "code deals with this by sorting or pairing terms, by accumulating in a wider type, or by compensated summation, "
    "which carries the lost low-order bits forward in a separate variable and adds them back at the end.",
    "In the market square the stalls open before sunrise. The cheese seller arrives first, stacking wheels of hard "
    "mountain cheese on a table covered with a checked cloth; then the woman with the honey, who labels each jar with "
    "the name of the meadow where her bees were kept that summer. By eight o'clock the square is crowded with people "
    "carrying baskets and arguing amiably about the price of asparagus. Children are given slices of apple to keep "
    "them quiet. At noon the church bell rings, and within half an hour the tables are folded, the awnings rolled up, "
    "and the square is empty again except for pigeons picking at the crumbs.",
    "Die Stadtbibliothek wurde im vergangenen Jahr vollständig renoviert. Wo früher dunkle Regale bis unter die "
    "Decke reichten, gibt es jetzt helle Lesesäle mit großen Fenstern zum Park. Die älteren Bestände sind in ein "
    "klimatisiertes Magazin im Keller umgezogen und können online bestellt werden; meist liegen sie schon am "
    "nächsten Morgen an der Ausleihtheke bereit. Besonders beliebt ist die neue Kinderabteilung mit einer kleinen "
    "Bühne, auf der samstags vorgelesen wird. Einige Stammgäste vermissen allerdings den alten Geruch nach Papier "
    "und Staub und sagen, die Bibliothek sei jetzt zwar schöner, aber auch ein bisschen weniger geheimnisvoll.",
    "Le petit port de pêche s'anime chaque matin vers cinq heures, quand les bateaux rentrent avec la marée. Les "
    "pêcheurs déchargent les caisses de sardines et de maquereaux sous la lumière jaune des lampadaires, pendant que "
    "les mouettes tournent au-dessus du quai en criant. Les acheteurs des restaurants de la côte arrivent ensuite, "
    "examinent le poisson d'un œil expert et négocient à voix basse. Vers sept heures, tout est vendu. Il ne reste "
    "que l'odeur de sel et de gasoil, quelques filets étendus pour sécher et un vieux chat qui attend patiemment "
    "qu'on lui jette les restes.",
    "El huerto de mi abuela ocupaba apenas unos metros detrás de la casa, pero daba de comer a toda la familia "
    "durante el verano. Había tomates atados a cañas, pimientos, calabacines que crecían más rápido de lo que "
    "podíamos recogerlos y una higuera enorme que daba sombra a la mesa de piedra. Ella regaba al amanecer, antes de "
    "que apretara el calor, y nos enseñó a distinguir las plantas buenas de las malas hierbas por el olor de las "
    "hojas. Cuando murió, nadie supo mantenerlo igual. Cada año lo intentamos de nuevo, y cada año los tomates nos "
    "salen un poco más pequeños que los suyos.",
    "Il treno regionale attraversa la valle lentamente, fermandosi in ogni paese anche quando nessuno sale o scende. "
    "Dai finestrini si vedono i vigneti disposti a terrazze sui pendii, i campanili di pietra e, più in alto, i "
    "boschi di castagni che in autunno diventano color rame. I pendolari leggono il giornale o dormono con la testa "
    "appoggiata al vetro. I turisti invece fotografano tutto, convinti che ogni curva nasconda il panorama più bello. "
    "Il capotreno li conosce bene e, quando il treno passa sul vecchio ponte sopra il fiume, rallenta ancora un po', "
    "senza che nessuno glielo abbia mai chiesto.",
    "Een goede fietsroute door de polder volgt de dijken, waar je uitzicht hebt over de weilanden en de sloten die "
    "het land in smalle stroken verdelen. In het voorjaar staan de lammetjes in de wei en broeden de grutto's in het "
    "hoge gras; wie stilstaat, hoort ze roepen. De wind is de grootste tegenstander: op de heenweg waait hij vaak in "
    "je rug, zodat je pas op de terugweg merkt hoe ver je eigenlijk gefietst hebt. Neem daarom altijd iets te eten "
    "mee, en een regenjas, want het weer kan binnen een kwartier omslaan van stralende zon naar een flinke bui.",
    "Ao fim da tarde, a praça da aldeia enche-se de gente. Os mais velhos sentam-se nos bancos à sombra das árvores "
    "e discutem futebol e política com a mesma paixão, enquanto as crianças correm atrás de uma bola entre as "
    "mesas da esplanada. O dono do café conhece todos pelo nome e sabe o que cada um vai pedir antes de se sentar. "
    "Quando o sol finalmente desaparece atrás dos montes, acendem-se as luzes da rua e ouve-se, vindo de uma janela "
    "aberta, alguém a praticar acordeão, sempre a mesma melodia, sempre com o mesmo erro no terceiro compasso.",
]

# (system or None, [(user, model), ...]); the last model turn is the continuation
CHATS = [
    (None, [("What is the difference between a process and a thread?",
             "A process is an independent program in execution with its own address space: its own memory, file "
             "descriptors and resources, isolated from other processes by the operating system. A thread is a unit "
             "of execution inside a process. All threads of a process share the same memory and resources, and each "
             "has only its own stack, registers and program counter.\n\nPractical consequences:\n\n1. **Isolation.** "
             "A crash or memory corruption in one process does not directly affect another; a bad thread can bring "
             "down its whole process.\n2. **Communication.** Threads communicate through shared memory, which is "
             "fast but needs synchronization such as locks. Processes communicate through pipes, sockets, shared "
             "memory segments or files, which is slower but explicit.\n3. **Cost.** Creating and switching threads "
             "is cheaper than creating and switching processes.\n\nIn Python specifically, the global interpreter "
             "lock means CPU-bound threads do not run bytecode in parallel, so `multiprocessing` or native "
             "extensions are used for parallel computation, while threads remain useful for I/O-bound work.")]),
    ("You are a concise assistant. Answer in at most three sentences.",
     [("Why is the sky blue?",
       "Sunlight is scattered by the molecules of the atmosphere, and shorter wavelengths scatter much more strongly "
       "than longer ones (Rayleigh scattering goes as the inverse fourth power of the wavelength). Blue light is "
       "therefore redirected across the whole sky and reaches your eyes from every direction. Violet scatters even "
       "more, but the Sun emits less of it and our eyes are less sensitive to it, so the sky looks blue.")]),
    (None, [("Can you help me write a polite email declining a meeting invitation?",
             "Of course. Here is a short, friendly version you can adapt:\n\n---\n\nSubject: Re: Project sync on "
             "Thursday\n\nHi Maria,\n\nThank you for the invitation to Thursday's project sync. Unfortunately I have "
             "a conflicting commitment at that time and won't be able to attend.\n\nI'd be glad to review the notes "
             "afterwards, and if there is anything you need from me beforehand, just let me know and I'll send it "
             "over by Wednesday.\n\nBest regards,\nDaniel\n\n---\n\nIf you'd like to propose another time instead, "
             "you can replace the second paragraph with: \"Would Friday morning work for a short catch-up instead?\"")]),
    (None, [("I have a list of dictionaries in Python and want to sort it by the 'age' key, oldest first.",
             "Use `sorted` with a key function and `reverse=True`:\n\n```python\npeople = [\n    {\"name\": \"Ana\", "
             "\"age\": 31},\n    {\"name\": \"Ben\", \"age\": 45},\n    {\"name\": \"Chen\", \"age\": 27},\n]\n\n"
             "oldest_first = sorted(people, key=lambda p: p[\"age\"], reverse=True)\n```\n\n`sorted` returns a new "
             "list; to sort in place use `people.sort(key=..., reverse=True)`. If some dictionaries might lack the "
             "key, use `p.get(\"age\", 0)` in the key function. For readability and speed you can also use "
             "`operator.itemgetter(\"age\")` instead of the lambda. Python's sort is stable, so people with the same "
             "age keep their original relative order.")]),
    (None, [("What's a good way to start learning to play the guitar as an adult?",
             "Start small and make practice a habit rather than an event.\n\n- **Get a playable instrument.** Ask a "
             "shop to check the action (string height); a guitar that is hard to press down is the most common "
             "reason beginners quit.\n- **Learn a few open chords first:** E minor, G, C, D and A minor cover "
             "hundreds of songs.\n- **Practise 15 to 20 minutes a day.** Short daily sessions build finger strength "
             "and calluses better than one long weekly session.\n- **Pick songs you like** and learn them slowly; "
             "use a metronome once the chord changes feel comfortable.\n- **Expect sore fingertips** for the first "
             "two or three weeks. It passes.\n\nA few lessons with a teacher early on are worth it, mainly to catch "
             "posture and hand-position habits before they set in.")]),
    (None, [("Translate to German: 'The train to Munich is delayed by twenty minutes.'",
             "Der Zug nach München hat zwanzig Minuten Verspätung.\n\nAn alternative that sounds like a station "
             "announcement is: \"Der Zug nach München verspätet sich um zwanzig Minuten.\"")]),
    (None, [("Summarize the main idea of supply and demand in a paragraph.",
             "Supply and demand describe how the price and quantity of a good are set in a market. Demand is the "
             "amount buyers want at each price, and it usually falls as the price rises; supply is the amount "
             "sellers are willing to offer, which usually rises with the price. The market tends toward the "
             "equilibrium price at which the two quantities match. If the price is above it, unsold goods pile up "
             "and sellers cut prices; if it is below, shortages appear and prices are bid up. Shifts in either "
             "curve, for example a bad harvest reducing supply or a fashion trend raising demand, move the "
             "equilibrium to a new price and quantity.")]),
    (None, [("My unit test passes locally but fails in CI. Where should I look first?",
             "The usual suspects, roughly in order of how often they are the cause:\n\n1. **Environment "
             "differences:** different Python or library versions (check the lock file and what CI actually "
             "installs), a different OS, locale or time zone.\n2. **Hidden state:** the test depends on a file, "
             "environment variable, cache or database row that exists on your machine but not in a clean checkout.\n"
             "3. **Test order:** CI may run tests in a different order or in parallel, exposing tests that depend "
             "on each other. Run the failing test alone and the whole suite with random ordering locally.\n4. "
             "**Timing:** sleeps, timeouts and race conditions show up on slower, shared CI machines.\n5. "
             "**Resources:** less memory, no GPU, no network access.\n\nStart by reading the exact failure message "
             "and reproducing CI's steps in a fresh container or virtual environment.")]),
    (None, [("Give me three ideas for a vegetarian dinner that takes under thirty minutes.",
             "1. **Chickpea and spinach curry.** Fry an onion with garlic, ginger and curry powder, add a tin of "
             "chickpeas and a tin of chopped tomatoes, simmer for ten minutes, then stir in a few handfuls of "
             "spinach and a splash of coconut milk. Serve with rice or flatbread.\n2. **Pasta with lemon, peas and "
             "ricotta.** Cook the pasta and add frozen peas for the last two minutes; toss with ricotta, lemon zest "
             "and juice, black pepper, parmesan and a little pasta water.\n3. **Black bean quesadillas.** Mash black "
             "beans with cumin and lime, spread on tortillas with cheese, corn and chopped peppers, fold and fry "
             "until crisp. Serve with salsa and a quick cabbage slaw.")]),
    (None, [("Explain recursion to a ten-year-old.",
             "Imagine you are standing in a long line and want to know what place you are in, but you can't see "
             "the front. You ask the person in front of you: \"What place are you?\" They don't know either, so they "
             "ask the person in front of them, and so on. Finally the question reaches the very first person, who "
             "says: \"I'm number one!\" Then the answers travel back: the second person says \"I'm two\", the third "
             "says \"I'm three\", until the answer reaches you.\n\nThat's recursion: solving a problem by asking a "
             "slightly smaller version of the same question, and having one simple case, the first person in line, "
             "where the answer is known right away.")]),
    (None, [("What is 15% of 240?", "15% of 240 is 36, because 10% of 240 is 24 and 5% is half of that, 12; "
             "24 + 12 = 36."),
            ("And if I add that to 240?", "240 + 36 = 276. Adding 15% is the same as multiplying by 1.15, and "
             "240 × 1.15 = 276.")]),
    (None, [("How do I undo the last git commit but keep my changes?",
             "Use a soft or mixed reset to move the branch back one commit without touching your files:\n\n```\ngit "
             "reset --soft HEAD~1\n```\n\nThis keeps the changes staged, ready to commit again. `git reset HEAD~1` "
             "(the default, `--mixed`) keeps them in the working tree but unstaged.\n\nIf you have already pushed "
             "the commit to a shared branch, prefer `git revert HEAD`, which creates a new commit undoing the last "
             "one instead of rewriting history that others may have pulled.")]),
    ("You are a helpful assistant for a hiking club.",
     [("Is it safe to hike alone in the mountains?",
       "It can be, with preparation, but solo hiking removes your margin for error, so plan for the case where you "
       "cannot help yourself.\n\n- Tell someone your exact route and when you expect to be back, and agree what they "
       "should do if you don't check in.\n- Choose well-travelled trails you know, especially at first.\n- Check the "
       "forecast and turn back early if the weather changes.\n- Carry the essentials: map and compass or a charged "
       "phone with offline maps, extra layers, water, food, a headlamp, a first-aid kit and an emergency blanket.\n- "
       "Consider a satellite messenger where there is no mobile coverage.\n\nMany experienced hikers enjoy going "
       "alone; the key is being honest about your skills and the conditions.")]),
    (None, [("Write a haiku about debugging.",
             "Silent for hours, the\nbug was a missing comma.\nThe coffee's gone cold.")]),
]

# ---- derived text (Python standard library, PSF license) --------------------------------------------------


def split_near_middle(text: str, lo: float = 0.35, hi: float = 0.65) -> tuple[str, str]:
    """Split at a paragraph break, else a sentence end, else a space, near the middle of the text."""
    n = len(text)
    mid = n // 2
    for seps in (("\n\n",), (". ", ".\n", "? ", "! "), (" ", "\n")):
        best = None
        for sep in seps:
            i = text.find(sep, int(n * lo))
            while 0 <= i <= n * hi:
                cut = i + len(sep) - (1 if sep[-1] in " \n" else 0)
                if best is None or abs(cut - mid) < abs(best - mid):
                    best = cut
                i = text.find(sep, i + 1)
        if best is not None:
            return text[:best], text[best:]
    return text[:mid], text[mid:]


def chat(turns: list[tuple[str, str]], system: str | None = None) -> tuple[str, str]:
    prompt = f"{TURN_SYSTEM}{system}{END}\n" if system else ""
    for user, model in turns[:-1]:
        prompt += f"{TURN_USER}{user}{END}\n{TURN_MODEL}{model}{END}\n"
    prompt += f"{TURN_USER}{turns[-1][0]}{END}\n{TURN_MODEL}"
    return prompt, turns[-1][1] + END


def stdlib_items(stdlib: Path) -> tuple[list[dict], list[dict]]:
    """(docstrings, functions) of the listed modules, in file and line order."""
    docs, funcs = [], []
    for rel in MODULES:
        path = stdlib / rel
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
        mod = rel[:-3].replace("/__init__", "").replace("/", ".")
        d = ast.get_docstring(tree)
        if d and len(d) >= 600:
            docs.append({"text": inspect.cleandoc(d), "source": f"Lib/{rel}", "name": mod})
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                d = ast.get_docstring(node)
                if d and len(d) >= 600:
                    docs.append({"text": inspect.cleandoc(d), "source": f"Lib/{rel}:{node.lineno}",
                                 "name": f"{mod}.{node.name}"})
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("__"):
                seg = ast.get_source_segment(src, node)
                d = ast.get_docstring(node)
                if seg and d and 60 <= len(d) and 500 <= len(seg) <= 2600:
                    funcs.append({"code": textwrap.dedent(" " * node.col_offset + seg), "doc": inspect.cleandoc(d),
                                  "source": f"Lib/{rel}:{node.lineno}", "name": f"{mod}.{node.name}",
                                  "lineno": node.lineno})
    docs.sort(key=lambda x: x["source"])  # ast.walk is breadth-first; keep a stable, readable order
    return docs, funcs


def code_split(code: str) -> tuple[str, str]:
    """Prompt = header + docstring + a couple of lines; continuation = the rest of the body."""
    lines = code.splitlines(keepends=True)
    tree = ast.parse(code)
    fn = tree.body[0]
    body_start = fn.body[1].lineno - 1 if len(fn.body) > 1 else len(lines) // 2  # after the docstring
    cut = min(max(body_start + 1, len(lines) // 4), len(lines) - 3)
    return "".join(lines[:cut]), "".join(lines[cut:])


def arithmetic_chats(rng: random.Random, n: int) -> list[tuple[str, str, str]]:
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            v, t1, t2 = rng.randint(40, 120), rng.randint(2, 5), rng.randint(1, 4)
            q = (f"A train travels at {v} km/h for {t1} hours, stops, then continues at {v + 20} km/h for {t2} more "
                 f"hours. How far does it travel in total?")
            a = (f"Split the trip into its two parts.\n\n- First part: {v} km/h × {t1} h = {v * t1} km.\n- Second "
                 f"part: {v + 20} km/h × {t2} h = {(v + 20) * t2} km.\n\nTotal distance: {v * t1} + {(v + 20) * t2} = "
                 f"**{v * t1 + (v + 20) * t2} km**.")
        elif kind == 1:
            p, r, y = rng.choice([500, 1000, 2500, 4000]), rng.choice([2, 3, 4, 5]), rng.randint(2, 4)
            vals = [p]
            for _ in range(y):
                vals.append(round(vals[-1] * (1 + r / 100), 2))
            steps = "\n".join(f"- After year {k}: {vals[k - 1]:.2f} × 1.{r:02d} = {vals[k]:.2f}" for k in range(1, y + 1))
            q = f"If I invest {p} euros at {r}% interest compounded yearly, how much do I have after {y} years?"
            a = (f"Each year the balance is multiplied by 1 + {r}/100 = 1.{r:02d}.\n\n{steps}\n\nSo after {y} years "
                 f"you have about **{vals[-1]:.2f} euros**, i.e. {p} × 1.{r:02d}^{y}.")
        elif kind == 2:
            a1, b1 = rng.randint(3, 9), rng.randint(11, 30)
            q = (f"A rectangle is {a1} cm wide and {b1} cm long. What are its area and perimeter, and what is the "
                 f"length of its diagonal to one decimal place?")
            diag = (a1 * a1 + b1 * b1) ** 0.5
            a = (f"- Area: {a1} × {b1} = **{a1 * b1} cm²**.\n- Perimeter: 2 × ({a1} + {b1}) = **{2 * (a1 + b1)} "
                 f"cm**.\n- Diagonal, by Pythagoras: √({a1}² + {b1}²) = √{a1 * a1 + b1 * b1} ≈ **{diag:.1f} cm**.")
        else:
            n1, k1 = rng.randint(12, 40), rng.randint(3, 6)
            q = f"I have {n1} cookies to share equally among {k1} friends. How many does each get, and how many are left?"
            a = (f"Divide {n1} by {k1}: {k1} × {n1 // k1} = {k1 * (n1 // k1)}, which is the largest multiple of {k1} "
                 f"not above {n1}.\n\nEach friend gets **{n1 // k1} cookies**, and **{n1 % k1}** "
                 f"{'cookie is' if n1 % k1 == 1 else 'cookies are'} left over.")
        p_, c_ = chat([(q, a)])
        out.append((p_, c_, "generated arithmetic"))
    return out


def build(stdlib: Path) -> list[dict]:
    rng = random.Random(SEED)
    docs, funcs = stdlib_items(stdlib)
    samples: list[dict] = []

    def add(prompt: str, cont: str, kind: str, source: str) -> None:
        if prompt.strip() and cont.strip():
            samples.append({"prompt": prompt, "continuation": cont, "kind": kind, "source": source})

    for i, text in enumerate(PROSE):
        add(*split_near_middle(text), "prose", f"dgemma-original prose #{i}")
    doc_pick = rng.sample(docs, k=min(70, len(docs)))
    for d in sorted(doc_pick, key=lambda x: x["source"]):
        # a shorter prompt leaves a longer continuation to fill the decoder's canvas
        add(*split_near_middle(d["text"], 0.25, 0.5), "prose", f"CPython 3.11 {d['source']} docstring")

    func_pick = sorted(rng.sample(funcs, k=min(150, len(funcs))), key=lambda x: x["source"])
    code_funcs, chat_funcs = func_pick[:85], func_pick[85:]
    for f in code_funcs:
        p, c = code_split(f["code"])
        add(f"# Python standard library, {f['name']}\n" + p, c, "code", f"CPython 3.11 {f['source']}")

    for system, turns in CHATS:
        add(*chat(turns, system), "chat", "dgemma-original conversation")
    for p, c, s in arithmetic_chats(rng, 24):
        add(p, c, "chat", s)
    for j, f in enumerate(chat_funcs):
        short = f["name"].rsplit(".", 1)
        if j % 2 == 0:
            q = f"What does `{f['name']}` in Python's standard library do?"
            a = f"`{short[-1]}` is defined in `{short[0]}`. Its documentation says:\n\n{f['doc']}"
        else:
            first = f["doc"].split("\n\n")[0].replace("\n", " ")
            q = f"Show me how `{f['name']}` is implemented. The docs say: \"{first}\""
            a = f"Here is the implementation from CPython's `{f['source'].split(':')[0]}`:\n\n```python\n{f['code']}```"
        add(*chat([(q, a)]), "chat", f"CPython 3.11 {f['source']}")

    # interleave kinds so any prefix (load_calibration(n=...)) is a mix
    by_kind: dict[str, list[dict]] = {}
    for s in samples:
        by_kind.setdefault(s["kind"], []).append(s)
    for lst in by_kind.values():
        rng.shuffle(lst)
    mixed, queues = [], [by_kind[k] for k in sorted(by_kind)]
    total = sum(len(q) for q in queues)
    taken = [0] * len(queues)
    while len(mixed) < total:
        # take from the kind that is furthest behind its share
        k = min(range(len(queues)), key=lambda j: (taken[j] / len(queues[j]) if taken[j] < len(queues[j]) else 2.0))
        mixed.append(queues[k][taken[k]])
        taken[k] += 1
    return mixed


def psf_license(stdlib: Path) -> str:
    text = (stdlib / "LICENSE.txt").read_text(encoding="utf-8")
    start = text.index("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
    end = text.index("BEOPEN.COM LICENSE AGREEMENT")
    return ("The standard-library excerpts in default.jsonl (records whose \"source\" starts with \"CPython\") are\n"
            "derived from CPython 3.11.7 and are used under the following license.\n\n" + text[start:end].rstrip() + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "converter" / "calib")
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    args = ap.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    samples = build(stdlib)
    body = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    lic = psf_license(stdlib)
    kinds = {k: sum(s["kind"] == k for s in samples) for k in ("prose", "code", "chat")}
    print(f"{len(samples)} samples {kinds}, {len(body.encode()) / 1e3:.0f} kB, Python {sys.version.split()[0]}")
    if args.check:
        same = (args.out / "default.jsonl").read_text(encoding="utf-8") == body
        print("identical to the committed file" if same else "DIFFERS from the committed file")
        raise SystemExit(0 if same else 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "default.jsonl").write_text(body, encoding="utf-8")
    (args.out / "LICENSE-PSF.txt").write_text(lic, encoding="utf-8")


if __name__ == "__main__":
    main()
