"""What the demo model is asked and how it answers, in the six languages of Parrot (en, zh, pt, ar, tr, ru).

Every question type has several paraphrases per language; the last one of each list is held out of
training (the held-out split asks with it). Answers are short natural sentences with the grammar
each language needs: Portuguese, Arabic and Russian adjectives agree with the shape's gender,
Russian colour questions are answered in the genitive ("красного цвета"), counted nouns take the
form their numeral governs (ru "две фигуры", ar "شكلان" / "ثلاثة أشكال", zh "两个").

Multiple-choice options use the plain (dictionary) form of a word: the masculine singular colour; a
multiple-choice question is answered with the right option's text (see parrot.demo.data).
"""

from __future__ import annotations

LANGS = ("en", "zh", "pt", "ar", "tr", "ru")
# VLMEvalKit's file-name suffix of each language (Chinese is "cn"), which chooses the MCQ instruction
EVAL_SUFFIX = {"en": "en", "zh": "cn", "pt": "pt", "ar": "ar", "tr": "tr", "ru": "ru"}
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white")
RGB = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (245, 215, 20),
    "orange": (250, 130, 10), "purple": (130, 40, 170), "black": (10, 10, 10), "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("left", "right", "top", "bottom")
COUNTS = (1, 2, 3, 4)
QTYPES = ("colour", "shape", "count", "position")

# ------------------------------------------------------------------ words
COLOUR_WORDS = {
    "en": dict(zip(COLOURS, ["red", "green", "blue", "yellow", "orange", "purple", "black", "white"])),
    "zh": dict(zip(COLOURS, ["红色", "绿色", "蓝色", "黄色", "橙色", "紫色", "黑色", "白色"])),
    "pt": dict(zip(COLOURS, ["vermelho", "verde", "azul", "amarelo", "laranja", "roxo", "preto", "branco"])),
    "ar": dict(zip(COLOURS, ["أحمر", "أخضر", "أزرق", "أصفر", "برتقالي", "بنفسجي", "أسود", "أبيض"])),
    "tr": dict(zip(COLOURS, ["kırmızı", "yeşil", "mavi", "sarı", "turuncu", "mor", "siyah", "beyaz"])),
    "ru": dict(zip(COLOURS, ["красный", "зелёный", "синий", "жёлтый", "оранжевый", "фиолетовый", "чёрный",
                             "белый"])),
}
COLOUR_FEM = {
    "pt": dict(zip(COLOURS, ["vermelha", "verde", "azul", "amarela", "laranja", "roxa", "preta", "branca"])),
    "ar": dict(zip(COLOURS, ["حمراء", "خضراء", "زرقاء", "صفراء", "برتقالية", "بنفسجية", "سوداء", "بيضاء"])),
    "ru": dict(zip(COLOURS, ["красная", "зелёная", "синяя", "жёлтая", "оранжевая", "фиолетовая", "чёрная",
                             "белая"])),
}
RU_COLOUR_GEN = dict(zip(COLOURS, ["красного", "зелёного", "синего", "жёлтого", "оранжевого", "фиолетового",
                                   "чёрного", "белого"]))
SHAPE_WORDS = {
    "en": dict(zip(SHAPES, ["circle", "square", "triangle", "star"])),
    "zh": dict(zip(SHAPES, ["圆形", "正方形", "三角形", "星形"])),
    "pt": dict(zip(SHAPES, ["círculo", "quadrado", "triângulo", "estrela"])),
    "ar": dict(zip(SHAPES, ["دائرة", "مربع", "مثلث", "نجمة"])),
    "tr": dict(zip(SHAPES, ["daire", "kare", "üçgen", "yıldız"])),
    "ru": dict(zip(SHAPES, ["круг", "квадрат", "треугольник", "звезда"])),
}
FEMININE = {"pt": {"star"}, "ar": {"circle", "star"}, "ru": {"star"}}
AR_DEFINITE = dict(zip(SHAPES, ["الدائرة", "المربع", "المثلث", "النجمة"]))
POSITION_WORDS = {
    "en": dict(zip(POSITIONS, ["left", "right", "top", "bottom"])),
    "zh": dict(zip(POSITIONS, ["左边", "右边", "上边", "下边"])),
    "pt": dict(zip(POSITIONS, ["à esquerda", "à direita", "em cima", "embaixo"])),
    "ar": dict(zip(POSITIONS, ["اليسار", "اليمين", "الأعلى", "الأسفل"])),
    "tr": dict(zip(POSITIONS, ["sol", "sağ", "üst", "alt"])),
    "ru": dict(zip(POSITIONS, ["слева", "справа", "сверху", "снизу"])),
}

# ------------------------------------------------------------------ questions (last of each list: held out)
QUESTIONS = {
    "en": {
        "colour": [
            "What colour is the shape?",
            "What color is the shape in the picture?",
            "Which colour does the shape have?",
            "Tell me the colour of the shape.",
            "What colour is it?",
            "Which color is the shape?",
            "What is the shape's colour?",
            "Can you tell me what colour the shape is?",
            "What is the colour of the figure in the image?",
        ],
        "shape": [
            "What shape is this?",
            "What shape is in the picture?",
            "Which shape do you see?",
            "Name the shape in the image.",
            "What is this shape?",
            "Which shape is it?",
            "What shape do you see in the image?",
            "Can you name the shape?",
            "What kind of shape is shown in the image?",
        ],
        "count": [
            "How many shapes are there?",
            "How many shapes are in the picture?",
            "Count the shapes in the image.",
            "How many figures can you see?",
            "How many shapes do you see?",
            "How many objects are in the image?",
            "How many shapes can you count?",
            "Tell me how many shapes there are.",
            "What is the number of shapes in the image?",
        ],
        "position": [
            "Where is the shape?",
            "Where is the shape in the picture?",
            "In which part of the image is the shape?",
            "Where is the figure located?",
            "Where is it?",
            "Where is the shape located in the image?",
            "Which side is the shape on?",
            "Where in the picture is the shape?",
            "On which side of the image is the shape?",
        ],
    },
    "zh": {
        "colour": [
            "图形是什么颜色的？",
            "图中的图形是什么颜色？",
            "这个形状是什么颜色？",
            "请说出图形的颜色。",
            "它是什么颜色？",
            "这个图形是什么颜色的？",
            "图形的颜色是什么？",
            "你能告诉我图形是什么颜色吗？",
            "图片里的图形是什么颜色的？",
        ],
        "shape": [
            "这是什么形状？",
            "图中是什么形状？",
            "你看到的是什么形状？",
            "请说出图中的形状。",
            "这是什么图形？",
            "图片里是什么形状？",
            "这个图形是什么形状？",
            "你能说出这是什么形状吗？",
            "图片里显示的是哪种形状？",
        ],
        "count": [
            "图中有几个图形？",
            "图片里有多少个图形？",
            "请数一数图中的图形。",
            "你能看到几个图形？",
            "有多少个形状？",
            "图里有几个形状？",
            "你看到了几个图形？",
            "数一数有几个图形。",
            "这张图片里一共有几个形状？",
        ],
        "position": [
            "图形在哪里？",
            "图形在图片的哪个位置？",
            "这个形状在图中的哪一边？",
            "图形位于哪里？",
            "它在哪里？",
            "图形在图的哪一边？",
            "这个图形在图里的什么地方？",
            "这个图形在哪儿？",
            "图片中的形状在什么位置？",
        ],
    },
    "pt": {
        "colour": [
            "De que cor é a forma?",
            "Qual é a cor da forma na imagem?",
            "Que cor tem a forma?",
            "Diga a cor da forma.",
            "Qual é a cor da forma?",
            "Que cor é essa forma?",
            "De que cor ela é?",
            "Você pode dizer a cor da forma?",
            "De que cor é a figura na imagem?",
        ],
        "shape": [
            "Que forma é esta?",
            "Qual é a forma na imagem?",
            "Que forma você vê?",
            "Diga o nome da forma na imagem.",
            "Qual é esta forma?",
            "Que forma aparece na imagem?",
            "Que figura é esta?",
            "Você sabe que forma é essa?",
            "Que tipo de forma aparece na imagem?",
        ],
        "count": [
            "Quantas formas há na imagem?",
            "Quantas formas existem na figura?",
            "Conte as formas na imagem.",
            "Quantas figuras você vê?",
            "Quantas formas você vê?",
            "Quantas formas tem na imagem?",
            "Quantos objetos há na imagem?",
            "Diga quantas formas há.",
            "Qual é o número de formas na imagem?",
        ],
        "position": [
            "Onde está a forma?",
            "Onde fica a forma na imagem?",
            "Em que parte da imagem está a forma?",
            "Onde está localizada a figura?",
            "Onde ela está?",
            "Em que lado está a forma?",
            "Onde se encontra a forma na imagem?",
            "Em que posição está a forma?",
            "De que lado da imagem está a forma?",
        ],
    },
    "ar": {
        "colour": [
            "ما لون الشكل؟",
            "ما لون الشكل في الصورة؟",
            "بأي لون الشكل؟",
            "أخبرني بلون الشكل.",
            "ما لونه؟",
            "ما هو لون الشكل؟",
            "بأي لون هذا الشكل؟",
            "هل يمكنك أن تخبرني بلون الشكل؟",
            "ما هو لون الشكل الموجود في الصورة؟",
        ],
        "shape": [
            "ما هذا الشكل؟",
            "ما الشكل الموجود في الصورة؟",
            "أي شكل تراه؟",
            "سمِّ الشكل في الصورة.",
            "ما هو هذا الشكل؟",
            "أي شكل هذا؟",
            "ما الشكل الذي تراه في الصورة؟",
            "هل يمكنك تسمية الشكل؟",
            "ما نوع الشكل الظاهر في الصورة؟",
        ],
        "count": [
            "كم شكلاً في الصورة؟",
            "كم عدد الأشكال في الصورة؟",
            "عُدَّ الأشكال في الصورة.",
            "كم شكلاً ترى؟",
            "كم شكلاً تشاهد في الصورة؟",
            "كم عدد الأشكال؟",
            "كم جسماً في الصورة؟",
            "أخبرني كم شكلاً يوجد.",
            "ما عدد الأشكال الموجودة في الصورة؟",
        ],
        "position": [
            "أين الشكل؟",
            "أين يقع الشكل في الصورة؟",
            "في أي جزء من الصورة يوجد الشكل؟",
            "أين يوجد الشكل؟",
            "أين هو؟",
            "في أي جهة يوجد الشكل؟",
            "أين مكان الشكل في الصورة؟",
            "ما موقع الشكل في الصورة؟",
            "في أي جهة من الصورة الشكل؟",
        ],
    },
    "tr": {
        "colour": [
            "Şekil ne renk?",
            "Resimdeki şekil ne renk?",
            "Şeklin rengi ne?",
            "Şeklin rengini söyle.",
            "Bu ne renk?",
            "Şekil hangi renk?",
            "Şeklin rengi nedir?",
            "Şeklin ne renk olduğunu söyler misin?",
            "Resimdeki şeklin rengi nedir?",
        ],
        "shape": [
            "Bu hangi şekil?",
            "Resimde hangi şekil var?",
            "Hangi şekli görüyorsun?",
            "Resimdeki şeklin adını söyle.",
            "Bu ne şekli?",
            "Resimdeki şekil ne?",
            "Bu şeklin adı ne?",
            "Şeklin adını söyler misin?",
            "Resimde ne tür bir şekil görünüyor?",
        ],
        "count": [
            "Resimde kaç şekil var?",
            "Resimde kaç tane şekil var?",
            "Resimdeki şekilleri say.",
            "Kaç şekil görüyorsun?",
            "Kaç şekil var?",
            "Resimde kaç nesne var?",
            "Resimde kaç şekil görüyorsun?",
            "Kaç tane şekil olduğunu söyle.",
            "Resimdeki şekillerin sayısı kaç?",
        ],
        "position": [
            "Şekil nerede?",
            "Şekil resmin neresinde?",
            "Şekil resmin hangi bölümünde?",
            "Şekil nerede duruyor?",
            "Şekil hangi tarafta?",
            "Şekil resimde nerede?",
            "Şeklin konumu ne?",
            "Şekil resmin ne tarafında?",
            "Şekil resmin hangi tarafında?",
        ],
    },
    "ru": {
        "colour": [
            "Какого цвета фигура?",
            "Какого цвета фигура на картинке?",
            "Какой цвет у фигуры?",
            "Назови цвет фигуры.",
            "Какого она цвета?",
            "Какой цвет у этой фигуры?",
            "Скажи, какого цвета фигура.",
            "Какого цвета эта фигура?",
            "Какого цвета фигура на изображении?",
        ],
        "shape": [
            "Что это за фигура?",
            "Какая фигура на картинке?",
            "Какую фигуру ты видишь?",
            "Назови фигуру на картинке.",
            "Какая это фигура?",
            "Что за фигура на картинке?",
            "Какую фигуру видно на картинке?",
            "Как называется эта фигура?",
            "Какая фигура изображена на картинке?",
        ],
        "count": [
            "Сколько фигур на картинке?",
            "Сколько фигур на изображении?",
            "Посчитай фигуры на картинке.",
            "Сколько фигур ты видишь?",
            "Сколько здесь фигур?",
            "Сколько фигур ты видишь на картинке?",
            "Сколько предметов на картинке?",
            "Скажи, сколько фигур на картинке.",
            "Какое количество фигур на изображении?",
        ],
        "position": [
            "Где находится фигура?",
            "Где фигура на картинке?",
            "В какой части картинки фигура?",
            "Где расположена фигура?",
            "Где она?",
            "С какой стороны фигура?",
            "Где на картинке фигура?",
            "В каком месте картинки фигура?",
            "С какой стороны картинки находится фигура?",
        ],
    },
}

# multiple-choice questions that name no question type: the options say what is asked (a share of the training
# multiple-choice turns use these, so that the model reads the options and not only the question's wording)
CHOOSE = {
    "en": ["Which option is right?", "Choose the option that matches the image.", "Which answer fits the picture?"],
    "zh": ["哪个选项是正确的？", "选择与图片相符的选项。", "哪个答案符合这张图？"],
    "pt": ["Qual opção está certa?", "Escolha a opção que corresponde à imagem.",
           "Qual resposta combina com a figura?"],
    "ar": ["أي خيار هو الصحيح؟", "اختر الخيار الذي يطابق الصورة.", "أي إجابة تناسب الصورة؟"],
    "tr": ["Hangi seçenek doğru?", "Resme uyan seçeneği seçin.", "Hangi cevap resme uyuyor?"],
    "ru": ["Какой вариант верный?", "Выберите вариант, который подходит к картинке.",
           "Какой ответ подходит к изображению?"],
}

# ------------------------------------------------------------------ answers
_NUM = {
    "en": ["one", "two", "three", "four"], "pt": ["uma", "duas", "três", "quatro"],
    "tr": ["bir", "iki", "üç", "dört"], "zh": ["一", "两", "三", "四"],
}


def _fem(lang: str, shape: str) -> bool:
    return shape in FEMININE.get(lang, set())


def colour_answer(lang: str, colour: str, shape: str) -> str:
    c = COLOUR_WORDS[lang][colour]
    if lang == "en":
        return f"The {SHAPE_WORDS['en'][shape]} is {c}."
    if lang == "zh":
        return f"{c}。"
    if lang == "pt":
        art = "A" if _fem("pt", shape) else "O"
        cc = COLOUR_FEM["pt"][colour] if _fem("pt", shape) else c
        return f"{art} {SHAPE_WORDS['pt'][shape]} é {cc}."
    if lang == "ar":
        cc = COLOUR_FEM["ar"][colour] if _fem("ar", shape) else c
        return f"{AR_DEFINITE[shape]} {cc}."
    if lang == "tr":
        return f"{c.capitalize()}."
    return f"Фигура {RU_COLOUR_GEN[colour]} цвета."  # ru: genitive of quality


def shape_answer(lang: str, shape: str) -> str:
    s = SHAPE_WORDS[lang][shape]
    if lang == "en":
        return f"It is a {s}."
    if lang == "zh":
        return f"这是一个{s}。"
    if lang == "pt":
        return f"É {'uma' if _fem('pt', shape) else 'um'} {s}."
    if lang == "ar":
        return f"{'إنها' if _fem('ar', shape) else 'إنه'} {s}."
    if lang == "tr":
        return f"Bu bir {s}."
    return f"Это {s}."


def count_answer(lang: str, n: int) -> str:
    if lang == "en":
        return f"There {'is one shape' if n == 1 else f'are {_NUM[lang][n - 1]} shapes'}."
    if lang == "zh":
        return f"有{_NUM[lang][n - 1]}个图形。"
    if lang == "pt":
        return f"Há {_NUM[lang][n - 1]} forma{'s' if n > 1 else ''} na imagem."
    if lang == "ar":
        return "في الصورة " + ["شكل واحد", "شكلان", "ثلاثة أشكال", "أربعة أشكال"][n - 1] + "."
    if lang == "tr":
        return f"Resimde {_NUM[lang][n - 1]} şekil var."
    return "На картинке " + ["одна фигура", "две фигуры", "три фигуры", "четыре фигуры"][n - 1] + "."


def position_answer(lang: str, position: str) -> str:
    p = POSITION_WORDS[lang][position]
    if lang == "en":
        return {"left": "On the left.", "right": "On the right.", "top": "At the top.",
                "bottom": "At the bottom."}[position]
    if lang == "zh":
        return f"在{p}。"
    if lang == "pt":
        return f"A forma está {p}."
    if lang == "ar":
        return ("على " if position in ("left", "right") else "في ") + p + "."
    if lang == "tr":
        return {"left": "Solda.", "right": "Sağda.", "top": "Üstte.", "bottom": "Altta."}[position]
    return f"Фигура {p}."


def describe(lang: str, colour: str, shape: str) -> str:
    """'a red circle' with the language's agreement and word order (used in answers and the demo)."""
    c, s = COLOUR_WORDS[lang][colour], SHAPE_WORDS[lang][shape]
    if lang == "en":
        return f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}"
    if lang == "zh":
        return f"一个{c}的{s}"
    if lang == "pt":
        return f"{'uma' if _fem('pt', shape) else 'um'} {s} {COLOUR_FEM['pt'][colour] if _fem('pt', shape) else c}"
    if lang == "ar":
        return f"{s} {COLOUR_FEM['ar'][colour] if _fem('ar', shape) else c}"
    if lang == "tr":
        return f"{c} bir {s}"
    return f"{COLOUR_FEM['ru'][colour] if _fem('ru', shape) else c} {s}"


def option_words(lang: str, qtype: str) -> dict:
    """Value -> option text of a multiple-choice question of this type."""
    if qtype == "colour":
        return COLOUR_WORDS[lang]
    if qtype == "shape":
        return SHAPE_WORDS[lang]
    if qtype == "position":
        return POSITION_WORDS[lang]
    return {n: str(n) for n in COUNTS}


def answer(lang: str, qtype: str, colour: str, shape: str, count: int, position: str) -> str:
    if qtype == "colour":
        return colour_answer(lang, colour, shape)
    if qtype == "shape":
        return shape_answer(lang, shape)
    if qtype == "count":
        return count_answer(lang, count)
    return position_answer(lang, position)
